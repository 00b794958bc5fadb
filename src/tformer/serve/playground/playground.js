// The tformer playground: the server's endpoints, from a page. No framework, no build step.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const state = { model: null, details: null, key: sessionStorage.getItem("tformer-api-key") || "" };
const TABS = {
  generate: "Generate", chat: "Chat", translate: "Translate", answer: "Answer",
  inside: "Inside", model: "Model",
};

// -- talking to the server ------------------------------------------------------------

class ApiError extends Error {}

async function errorMessage(response) {
  try {
    const data = await response.json();
    return (data.error && data.error.message) || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// fetch, with the API key once the server asked for one; a failure is an ApiError whose
// message is the server's own (OpenAI's error object).
async function call(path, body, signal) {
  for (let attempt = 0; ; attempt++) {
    const headers = { "Content-Type": "application/json" };
    if (state.key) headers.Authorization = `Bearer ${state.key}`;
    const options = body === undefined
      ? { headers, signal }
      : { method: "POST", headers, body: JSON.stringify(body), signal };
    const response = await fetch(path, options);
    if (response.status === 401 && attempt < 3) {
      state.key = await askForKey(await errorMessage(response));
      continue;
    }
    if (!response.ok) throw new ApiError(await errorMessage(response));
    return response;
  }
}

let keyAsked = null;  // the answer being waited for, shared by every request that got a 401

function askForKey(reason) {
  if (keyAsked) return keyAsked;
  const dialog = $("#key-dialog");
  $("#key-reason").textContent = `${reason}.`;
  $("#api-key").value = "";
  dialog.returnValue = "";  // "ok" once the key is given; Escape leaves it empty
  dialog.showModal();
  keyAsked = new Promise((resolve, reject) => {
    dialog.addEventListener("close", () => {
      keyAsked = null;
      const key = $("#api-key").value.trim();
      if (dialog.returnValue !== "ok" || !key) {
        reject(new ApiError("this server needs an API key; reload the page to give one"));
        return;
      }
      sessionStorage.setItem("tformer-api-key", key);
      resolve(key);
    }, { once: true });
  });
  return keyAsked;
}

// The data: {...} objects of a server-sent event stream, until [DONE].
async function* streamed(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(chunk.error.message);
          yield chunk;
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // a consumer that stopped early closes the stream
  }
}

function showError(where, error) {
  const box = $(`#${where}-error`);
  if (!error) { box.hidden = true; box.textContent = ""; return; }
  if (error instanceof ApiError) box.textContent = error.message;
  else if (error instanceof TypeError) box.textContent = `The server could not be reached (${error.message}).`;
  else box.textContent = `${error.name}: ${error.message}`;
  box.hidden = false;
}

function aborted(error) { return error && error.name === "AbortError"; }

// Ctrl/Cmd+Enter in a form's text box submits it.
function submitOnCtrlEnter(form) {
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
}

// -- tokens and colours --------------------------------------------------------------

// A token as the tokenizer split it, its whitespace made visible.
function visible(text) {
  if (text === "") return "∅";
  return text.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "→");
}

// Probability 0..1 -> a background from red (unlikely) through yellow to green (likely).
function probabilityColour(p) { return `hsl(${Math.round(120 * p)}, 75%, 82%)`; }

// Attention weight 0..1 -> white to deep blue.
function weightColour(w) {
  const t = Math.max(0, Math.min(1, w));
  return `rgb(${Math.round(255 - 215 * t)}, ${Math.round(255 - 175 * t)}, ${Math.round(255 - 55 * t)})`;
}

function showTooltip(target, rows) {
  const tip = $("#tooltip");
  tip.replaceChildren();
  const table = document.createElement("table");
  for (const [left, right] of rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = left;
    tr.insertCell().textContent = right;
  }
  tip.append(table);
  tip.hidden = false;
  const box = target.getBoundingClientRect();
  tip.style.left = `${Math.min(box.left, window.innerWidth - tip.offsetWidth - 8)}px`;
  tip.style.top = `${box.bottom + 6}px`;
}

function hideTooltip() { $("#tooltip").hidden = true; }

function percent(p) {  // two significant figures below 0.1%: 0.0020%, not 0.00%
  return p < 0.001 ? `${(100 * p).toPrecision(2)}%` : `${(100 * p).toFixed(p < 0.1 ? 2 : 1)}%`;
}

// -- tabs ----------------------------------------------------------------------------

function tabsFor(details) {
  if (details.kind === "translation") return ["translate", "inside", "model"];
  if (details.kind === "qa") return ["answer", "model"];
  const chat = details.chat_template && details.chat_template !== "default";
  return chat ? ["generate", "chat", "inside", "model"] : ["generate", "inside", "model"];
}

function showTab(name) {
  for (const button of document.querySelectorAll("#tabs button")) {
    const on = button.dataset.tab === name;
    button.setAttribute("aria-selected", String(on));
  }
  for (const panel of document.querySelectorAll("main > section")) {
    panel.hidden = panel.id !== `tab-${name}`;
  }
  if (name === "inside") copyTextInside();  // the text on screen, if new
}

function buildTabs(names) {
  const nav = $("#tabs");
  for (const name of names) {
    const button = document.createElement("button");
    button.type = "button";
    button.id = `tab-button-${name}`;
    button.dataset.tab = name;
    button.setAttribute("role", "tab");
    button.setAttribute("aria-controls", `tab-${name}`);
    button.textContent = TABS[name];
    button.addEventListener("click", () => showTab(name));
    nav.append(button);
  }
  for (const panel of document.querySelectorAll("main > section")) {
    if (!names.includes(panel.id.slice(4))) panel.remove();  // absent, not just hidden
  }
  showTab(names[0]);
}

// -- Generate ------------------------------------------------------------------------

let generation = null;  // the AbortController of the stream running, if one is

function numberField(id) {
  const text = $(`#${id}`).value.trim();
  return text === "" ? undefined : Number(text);
}

function addToken(output, text, entries) {
  const span = document.createElement("span");
  span.className = "token";
  span.textContent = text;
  span.tabIndex = 0;
  const first = entries[0];
  if (first && first.logprob !== null) {
    const p = Math.exp(first.logprob);
    span.style.background = probabilityColour(p);
    span.dataset.probability = p.toFixed(4);
    const rows = [];
    for (const entry of entries) {
      rows.push([`chosen ${visible(entry.token)}`, percent(Math.exp(entry.logprob))]);
      const alternatives = Object.entries(entry.top || {}).sort((a, b) => b[1] - a[1]);
      for (const [token, logprob] of alternatives) rows.push([visible(token), percent(Math.exp(logprob))]);
    }
    span.dataset.alternatives = JSON.stringify(rows);
    const show = () => showTooltip(span, rows);
    span.addEventListener("mouseenter", show);
    span.addEventListener("focus", show);
    span.addEventListener("mouseleave", hideTooltip);
    span.addEventListener("blur", hideTooltip);
  }
  output.append(span);
}

async function generate(event) {
  event.preventDefault();
  if (generation) return;
  showError("generate", null);
  const prompt = $("#prompt").value;
  const stop = $("#stop").value.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
  const body = {
    model: state.model, prompt, stream: true, logprobs: 5,
    temperature: numberField("temperature"), top_k: numberField("top_k"),
    top_p: numberField("top_p"), repetition_penalty: numberField("repetition_penalty"),
    max_tokens: numberField("max_tokens"), seed: numberField("seed"),
    stop: stop === "" ? undefined : stop,
  };
  const output = $("#generate-output");
  output.replaceChildren();
  const shown = document.createElement("span");
  shown.className = "prompt";
  shown.textContent = prompt;
  output.append(shown);
  generation = new AbortController();
  $("#generate-run").disabled = true;
  $("#generate-stop").disabled = false;
  const status = $("#generate-status");
  status.textContent = "waiting for the first token…";
  output.setAttribute("aria-busy", "true");
  const started = performance.now();
  let tokens = 0, reason = null;
  try {
    const response = await call("/v1/completions", body, generation.signal);
    for await (const chunk of streamed(response)) {
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (tokens === 0 && choice.text) {
        output.dataset.firstTokenMs = (performance.now() - started).toFixed(1);
      }
      const lp = choice.logprobs;
      const entries = lp ? lp.tokens.map((token, i) => ({
        token, logprob: lp.token_logprobs[i], top: lp.top_logprobs[i],
      })) : [];
      if (choice.text) addToken(output, choice.text, entries);
      tokens += entries.length;
      if (choice.finish_reason) reason = choice.finish_reason;
      status.textContent = `${tokens} tokens…`;
    }
    const why = { stop: "stopped at a stop token or string", length: "reached max tokens" }[reason];
    status.textContent = `${tokens} tokens, ${why || "the stream ended early"}`;
  } catch (error) {
    if (aborted(error)) status.textContent = `stopped after ${tokens} tokens`;
    else { status.textContent = ""; showError("generate", error); }
  } finally {
    generation = null;
    output.removeAttribute("aria-busy");
    $("#generate-run").disabled = false;
    $("#generate-stop").disabled = true;
  }
}

// -- Chat ----------------------------------------------------------------------------

let conversation = [];
let chatting = null;

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("#chat-log").append(div);
  return div;
}

async function chat(event) {
  event.preventDefault();
  if (chatting) return;
  const text = $("#chat-input").value.trim();
  if (!text) return;
  showError("chat", null);
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  $("#chat-input").value = "";
  const reply = addMessage("assistant", "");
  chatting = new AbortController();
  $("#chat-send").disabled = true;
  $("#chat-stop").disabled = false;
  try {
    const body = { model: state.model, messages: conversation, stream: true };  // to the window's end
    const response = await call("/v1/chat/completions", body, chatting.signal);
    for await (const chunk of streamed(response)) {
      const delta = chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) reply.textContent += delta.content;
    }
    conversation.push({ role: "assistant", content: reply.textContent });
  } catch (error) {
    if (aborted(error)) {
      conversation.push({ role: "assistant", content: reply.textContent });
    } else {  // the turn did not happen: take it back, its text into the box again
      conversation.pop();
      reply.previousElementSibling.remove();
      reply.remove();
      $("#chat-input").value = text;
      showError("chat", error);
    }
  } finally {
    chatting = null;
    $("#chat-send").disabled = false;
    $("#chat-stop").disabled = true;
  }
}

// -- heatmaps ------------------------------------------------------------------------

function axis(kind, labels, cell) {
  const list = document.createElement("ol");
  list.className = `axis ${kind}`;
  for (const label of labels) {
    const item = document.createElement("li");
    item.className = "token-label";
    item.textContent = visible(label);
    item.style[kind === "rows" ? "height" : "width"] = `${cell}px`;
    item.style.lineHeight = `${cell}px`;
    list.append(item);
  }
  return list;
}

// One head's weights (rows: queries, columns: keys) as a figure: a canvas of cells, the
// tokens along both sides, and each cell's weight on hover.
function heatmap(weights, queries, keys, caption, labelled) {
  const cell = Math.max(labelled ? 10 : 3, Math.min(24, Math.floor((labelled ? 480 : 160) / Math.max(keys.length, queries.length))));
  const figure = document.createElement("figure");
  figure.className = "heatmap";
  figure.style.margin = "0";
  const title = document.createElement("figcaption");
  title.textContent = caption;
  figure.append(title);
  const canvas = document.createElement("canvas");
  canvas.width = keys.length * cell;
  canvas.height = queries.length * cell;
  canvas.dataset.rows = String(queries.length);
  canvas.dataset.cols = String(keys.length);
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `${caption}: ${queries.length} by ${keys.length} attention weights`);
  const context = canvas.getContext("2d");
  weights.forEach((row, i) => row.forEach((w, j) => {
    context.fillStyle = weightColour(w);
    context.fillRect(j * cell, i * cell, cell, cell);
  }));
  // A cell's weight: under the pointer, or, from the keyboard, at a cursor the arrow keys move.
  const tell = (i, j, x, y) => showTooltip({ getBoundingClientRect: () => ({ left: x, bottom: y }) },
    [[`${visible(queries[i])} → ${visible(keys[j])}`, weights[i][j].toFixed(3)]]);
  canvas.addEventListener("mousemove", (event) => {
    const box = canvas.getBoundingClientRect();
    const j = Math.floor((event.clientX - box.left) / (box.width / keys.length));
    const i = Math.floor((event.clientY - box.top) / (box.height / queries.length));
    if (i < 0 || j < 0 || i >= queries.length || j >= keys.length) return;
    tell(i, j, event.clientX, event.clientY);
  });
  canvas.addEventListener("mouseleave", hideTooltip);
  canvas.tabIndex = 0;
  let cursor = [0, 0];
  const tellCursor = () => {
    const box = canvas.getBoundingClientRect();
    const [i, j] = cursor;
    tell(i, j, box.left + (j + 1) * (box.width / keys.length), box.top + (i + 1) * (box.height / queries.length));
  };
  canvas.addEventListener("focus", tellCursor);
  canvas.addEventListener("blur", hideTooltip);
  canvas.addEventListener("keydown", (event) => {
    const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    const move = moves[event.key];
    if (!move) return;
    event.preventDefault();
    cursor = [Math.max(0, Math.min(queries.length - 1, cursor[0] + move[0])),
      Math.max(0, Math.min(keys.length - 1, cursor[1] + move[1]))];
    tellCursor();
  });
  if (labelled) figure.append(axis("cols", keys, cell), axis("rows", queries, cell));
  figure.append(canvas);
  return figure;
}

// Every head of a layer in a grid, or one head large, into `where`.
function drawAttention(where, attention, queries, keys, head) {
  const box = $(where);
  box.replaceChildren();
  if (head === "all") {
    attention.forEach((weights, h) => box.append(heatmap(weights, queries, keys, `head ${h}`, false)));
  } else {
    box.append(heatmap(attention[Number(head)], queries, keys, `head ${head}`, true));
  }
}

function fillPicker(select, count, label, withAll) {
  const previous = select.value;
  select.replaceChildren();
  if (withAll) select.append(new Option("all heads", "all"));
  for (let i = 0; i < count; i++) select.append(new Option(`${label} ${i}`, String(i)));
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}

// -- Inside --------------------------------------------------------------------------

let inspection = null;  // the last /v1/inspect answer
let inspecting = false;

let copied = "";  // the generated text last copied into Inside

function copyTextInside() {
  const translated = $("#translate-output");
  if (translated) {  // a translation model: its last source and translation
    const pair = `${$("#translate-input").value}\u0000${translated.textContent}`;
    if (translated.textContent && pair !== copied) {
      $("#inside-text").value = $("#translate-input").value;
      $("#inside-target").value = translated.textContent;
      copied = pair;
    }
    return;
  }
  const generated = $("#generate-output");
  const text = generated ? generated.textContent : "";
  if (text.trim() && text !== copied) {
    $("#inside-text").value = text;
    copied = text;
  }
}

function drawInsideAttention() {
  const r = inspection;
  drawAttention("#inside-heatmap", r.attention, r.query_tokens || r.tokens, r.key_tokens || r.tokens, $("#inside-head").value);
}

async function lookInside(event) {
  if (event) event.preventDefault();
  if (inspecting) return;
  inspecting = true;
  showError("inside", null);
  $("#inside-run").disabled = true;
  $("#inside-layer").disabled = true;
  try {
    const body = { model: state.model, text: $("#inside-text").value, layer: Number($("#inside-layer").value || 0), top: 5 };
    if (state.details.kind === "translation") {
      body.stack = $("#inside-stack").value;
      const target = $("#inside-target").value;
      if (target.trim()) body.target = target;
    }
    const response = await call("/v1/inspect", body);
    inspection = await response.json();
    fillPicker($("#inside-layer"), inspection.n_layers, "layer", false);
    $("#inside-layer").value = String(inspection.layer);
    fillPicker($("#inside-head"), inspection.n_heads, "head", true);
    drawInsideAttention();
    drawLogitLens(inspection);
    const names = inspection.residual_layers;
    const short = (name) => name.replace("blocks.", "in ").replace("encoder_layers.", "enc ").replace("decoder_layers.", "dec ");
    drawBars($("#residual-norms"), inspection.residual_norms, (i) => short(names[i]));
  } catch (error) {
    showError("inside", error);
  } finally {
    inspecting = false;
    $("#inside-run").disabled = false;
    $("#inside-layer").disabled = false;
  }
}

function drawLogitLens(result) {
  const table = $("#logit-lens");
  table.replaceChildren();
  const head = table.createTHead().insertRow();
  head.append(document.createElement("th"));
  for (const token of result.target_tokens || result.tokens) {  // the positions predicting
    const th = document.createElement("th");
    th.textContent = visible(token);
    head.append(th);
  }
  const body = table.createTBody();
  result.logit_lens.forEach((positions, layer) => {
    const row = body.insertRow();
    const th = document.createElement("th");
    th.textContent = layer === 0 ? "embeddings" : `layer ${layer - 1}`;
    row.append(th);
    for (const top of positions) {
      const cell = row.insertCell();
      cell.textContent = visible(top[0].token);
      cell.style.background = probabilityColour(top[0].probability);
      cell.tabIndex = 0;  // its alternatives on hover, on focus and on a tap
      const show = () => showTooltip(cell, top.map((c) => [visible(c.token), percent(c.probability)]));
      cell.addEventListener("mouseenter", show);
      cell.addEventListener("focus", show);
      cell.addEventListener("mouseleave", hideTooltip);
      cell.addEventListener("blur", hideTooltip);
    }
  });
}

// -- small SVG charts ------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function drawBars(svg, values, label) {
  svg.replaceChildren();
  const width = 640, height = 220, pad = 28, top = Math.max(...values) || 1;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const slot = (width - 2 * pad) / values.length;
  values.forEach((v, i) => {
    const h = (height - 2 * pad) * (v / top);
    const bar = svgElement("rect", { x: pad + i * slot + 2, y: height - pad - h, width: slot - 4, height: h, fill: "#2f5fd0" });
    bar.append(svgElement("title", {}, `${label(i)}: ${v.toFixed(3)}`));
    svg.append(bar, svgElement("text", { x: pad + i * slot + slot / 2, y: height - 8, "text-anchor": "middle" }, label(i)));
  });
  svg.append(svgElement("text", { x: 4, y: 14 }, `max ${top.toFixed(2)}`));
}

function drawCurve(svg, series) {
  svg.replaceChildren();
  const width = 640, height = 220, pad = 36;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const points = series.flatMap((s) => s.points);
  if (points.length === 0) return;
  const steps = points.map((p) => p[0]), losses = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps) || 1];
  const [y0, y1] = [Math.min(...losses), Math.max(...losses)];
  const x = (s) => pad + (width - 2 * pad) * ((s - x0) / (x1 - x0 || 1));
  const y = (l) => height - pad - (height - 2 * pad) * ((l - y0) / (y1 - y0 || 1));
  for (const s of series) {
    if (s.points.length === 0) continue;
    const line = s.points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    svg.append(svgElement("polyline", { points: line, fill: "none", stroke: s.colour, "stroke-width": 2 }));
  }
  svg.append(
    svgElement("text", { x: 4, y: 14 }, `loss ${y1.toFixed(2)}`),
    svgElement("text", { x: 4, y: height - pad }, y0.toFixed(2)),
    svgElement("text", { x: width - pad, y: height - 8, "text-anchor": "end" }, `step ${x1}`),
  );
  series.forEach((s, i) => svg.append(svgElement("text", { x: width - 150, y: 16 + 14 * i, style: `fill: ${s.colour}` }, s.name)));
}

// -- Translate -----------------------------------------------------------------------

let alignment = null;
let translating = false;

async function translate(event) {
  event.preventDefault();
  if (translating) return;
  translating = true;
  showError("translate", null);
  $("#translate-run").disabled = true;
  $("#translate-heatmap").replaceChildren();
  try {
    const text = $("#translate-input").value;
    const body = { model: state.model, input: text, beam_size: numberField("beam_size") };
    const result = await (await call("/v1/translations", body)).json();
    const translation = result.data[0].translation;
    $("#translate-output").textContent = translation;
    if (translation) await drawAlignment(text, translation);
  } catch (error) {
    showError("translate", error);
  } finally {
    translating = false;
    $("#translate-run").disabled = false;
  }
}

async function changeAlignmentLayer() {
  if (!alignment || translating) return;
  translating = true;
  $("#translate-layer").disabled = true;
  try {
    await drawAlignment(alignment.text, alignment.target);
  } catch (error) {
    showError("translate", error);
  } finally {
    translating = false;
    $("#translate-layer").disabled = false;
  }
}

async function drawAlignment(text, target) {
  const layer = Number($("#translate-layer").value || 0);
  const body = { model: state.model, text, target, layer };
  alignment = await (await call("/v1/inspect", body)).json();
  fillPicker($("#translate-layer"), alignment.n_layers, "layer", false);
  $("#translate-layer").value = String(alignment.layer);
  fillPicker($("#translate-head"), alignment.n_heads, "head", true);
  drawAttention("#translate-heatmap", alignment.attention, alignment.target_tokens, alignment.tokens, $("#translate-head").value);
}

// -- Answer --------------------------------------------------------------------------

let answering = false;

async function answerQuestion(event) {
  event.preventDefault();
  if (answering) return;
  answering = true;
  showError("answer", null);
  $("#answer-run").disabled = true;
  try {
    const context = $("#context").value.trim();
    const body = { model: state.model, question: $("#question").value, context: context || undefined };
    const result = await (await call("/v1/answers", body)).json();
    const out = $("#answer-output");
    out.replaceChildren();
    if (result.answers.length === 0) out.textContent = "No answer found.";
    result.answers.forEach((found, rank) => out.append(answerCard(found, rank)));
  } catch (error) {
    showError("answer", error);
  } finally {
    answering = false;
    $("#answer-run").disabled = false;
  }
}

function answerCard(found, rank) {
  const card = document.createElement("article");
  card.className = "answer";
  const title = document.createElement("h3");
  title.textContent = rank === 0 ? `Answer: ${found.answer}` : `Candidate ${rank + 1}: ${found.answer}`;
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.textContent = [`score ${found.score.toFixed(3)}`, found.location, found.bm25 != null ? `BM25 ${found.bm25.toFixed(2)}` : null]
    .filter(Boolean).join(" · ");
  const passage = document.createElement("p");
  const at = found.answer ? found.passage.indexOf(found.answer) : -1;
  if (at >= 0) {
    const mark = document.createElement("mark");
    mark.textContent = found.answer;
    passage.append(found.passage.slice(0, at), mark, found.passage.slice(at + found.answer.length));
  } else {
    passage.textContent = found.passage;
  }
  card.append(title, meta, passage);
  return card;
}

// -- Model ---------------------------------------------------------------------------

function showModel(details) {
  const facts = $("#model-facts");
  const rows = [
    ["model", details.id], ["kind", details.kind],
    ["parameters", details.parameters != null ? details.parameters.toLocaleString("en") : "unknown"],
    ["context", details.context_length != null ? `${details.context_length} tokens` : "—"],
    ["tokenizer", `${details.tokenizer.type}, ${details.tokenizer.vocab_size ?? "?"} tokens`],
    ["decoding", details.decoding || "—"],
  ];
  if (details.kind === "language") rows.push(["chat template", details.chat_template || "none"]);
  for (const [name, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    facts.append(dt, dd);
  }
  $("#model-config").textContent = JSON.stringify(details.config, null, 2);
  const curve = details.training;
  if (curve && (curve.train.length || curve.validation.length)) {
    drawCurve($("#training-curve"), [
      { name: "training loss", points: curve.train, colour: "#2f5fd0" },
      { name: "validation loss", points: curve.validation, colour: "#d0602f" },
    ]);
  } else {
    $("#training-curve").remove();
    $("#training-note").textContent = "This checkpoint is not a training run directory: no metrics.jsonl beside it.";
  }
}

// -- start -----------------------------------------------------------------------------

function wire() {
  const on = (id, type, handler) => { const element = $(id); if (element) element.addEventListener(type, handler); };
  on("#generate-form", "submit", generate);
  on("#generate-stop", "click", () => generation && generation.abort());
  on("#chat-form", "submit", chat);
  on("#chat-stop", "click", () => chatting && chatting.abort());
  on("#chat-clear", "click", () => {
    if (chatting) chatting.abort();
    conversation = [];
    $("#chat-log").replaceChildren();
  });
  on("#inside-form", "submit", lookInside);
  on("#inside-layer", "change", () => lookInside());
  on("#inside-head", "change", () => inspection && drawInsideAttention());
  on("#inside-stack", "change", () => {
    const c = state.details.config;
    fillPicker($("#inside-layer"), $("#inside-stack").value === "encoder" ? c.n_encoder_layers : c.n_decoder_layers, "layer", false);
    if (inspection) lookInside();
  });
  on("#translate-form", "submit", translate);
  on("#translate-layer", "change", changeAlignmentLayer);
  on("#translate-head", "change", () => alignment && drawAttention("#translate-heatmap", alignment.attention, alignment.target_tokens, alignment.tokens, $("#translate-head").value));
  on("#answer-form", "submit", answerQuestion);
  for (const form of document.querySelectorAll("main form")) submitOnCtrlEnter(form);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function start() {
  try {
    const models = await (await call("/v1/models")).json();
    state.model = models.data[0].id;
    for (let tries = 0; ; tries++) {  // 503 while the model loads: wait for it
      try {
        state.details = await (await call(`/v1/models/${encodeURIComponent(state.model)}`)).json();
        break;
      } catch (error) {
        if (!/loading/.test(error.message) || tries >= 120) throw error;
        $("#model-line").textContent = "the model is loading…";
        await sleep(1000);
      }
    }
  } catch (error) {
    $("#model-line").textContent = "";
    const box = $("#page-error");
    box.textContent = `Could not reach the model: ${error.message}`;
    box.hidden = false;
    return;
  }
  const d = state.details;
  $("#model-line").textContent = `${d.id} · ${d.kind} model · ${d.parameters != null ? d.parameters.toLocaleString("en") : "?"} parameters`;
  buildTabs(tabsFor(d));
  wire();
  showModel(d);
  const c = d.config || {};
  const layers = d.kind === "translation" ? c.n_decoder_layers : c.n_layers;
  if (d.kind === "translation" && $("#inside-translation")) {
    $("#inside-translation").hidden = false;
    $("#inside-text").value = "";
  }
  for (const where of ["inside", "translate"]) {
    if (!$(`#${where}-layer`) || !layers) continue;
    fillPicker($(`#${where}-layer`), layers, "layer", false);
    fillPicker($(`#${where}-head`), c.n_heads, "head", true);
  }
}

start();
