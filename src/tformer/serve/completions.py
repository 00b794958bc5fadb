"""POST /v1/completions and /v1/chat/completions: requests become scheduler jobs, and the
jobs' events become OpenAI's responses, whole or streamed as server-sent events.

    data: {"id": ..., "object": "text_completion", "choices": [{"index": 0, "text": ...}]}
    ...
    data: [DONE]

A request with n choices and several prompts makes one job per (prompt, choice); choice
index = prompt * n + j, and with a seed, choice j samples with seed + j (as `tformer
generate --num-samples`). Everything that can be wrong with a request is found before
its jobs are queued, so such an error is a plain HTTP error, never a broken stream.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tformer.errors import ConfigError
from tformer.generate.chat import check_messages
from tformer.generate.decode import SamplingConfig
from tformer.generate.limits import LENGTH, STOP
from tformer.generate.text import check_unicode, encode_prompt
from tformer.serve.errors import APIError, busy, invalid
from tformer.serve.protocol import MAX_STOPS, ChatRequest, CompletionRequest, Sampling
from tformer.serve.scheduler import CANCELLED, ERROR, Event, Job, QueueFull, TokenLogprob
from tformer.serve.service import Service

GREEDY_BELOW = 1e-5  # a temperature this low means greedy, as vLLM reads it


@dataclass
class Choice:
    """What a choice has received so far."""

    text: list[str] = field(default_factory=list)
    tokens: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


class Batch:
    """A request's jobs, their events delivered to the event loop's queue."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.jobs: list[Job] = []

    def add(
        self,
        prompt: list[int],
        config: SamplingConfig,
        stops: list[str],
        logprobs: int | None,
        prompt_logprobs: bool = False,
    ) -> None:
        index = len(self.jobs)
        job = Job(prompt, config, stops, lambda event: None, logprobs, prompt_logprobs)

        def emit(event: Event) -> None:  # on the scheduler's thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                job.cancelled = True

        job.emit = emit
        self.jobs.append(job)

    def submit(self) -> None:
        scheduler = self.service.scheduler
        try:
            scheduler.submit(self.jobs)
        except QueueFull as e:
            raise busy(str(e)) from None

    def cancel(self) -> None:
        for job in self.jobs:
            self.service.scheduler.cancel(job)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every job's events until each has finished."""
        open_jobs = len(self.jobs)
        while open_jobs:
            index, event = await self.queue.get()
            if event.finish_reason is not None:
                open_jobs -= 1
            yield index, event


async def watch_disconnect(request: Request, batch: Batch) -> None:
    """Cancel the batch when the client goes away (queued or mid-stream)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            batch.cancel()
            return


# -- the requests ----------------------------------------------------------------------


def sampling_config(req: Sampling, max_tokens: int, service: Service, j: int) -> SamplingConfig:
    greedy = req.temperature < GREEDY_BELOW  # logits / T overflows below this
    if req.logit_bias:
        raise invalid("logit_bias is not supported by this server", "logit_bias")
    try:
        return SamplingConfig(
            max_new_tokens=max_tokens,
            temperature=1.0 if greedy else req.temperature,
            top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,
            top_p=req.top_p if req.top_p < 1 else None,
            min_p=req.min_p if req.min_p else None,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            do_sample=not greedy,
            seed=None if req.seed is None else req.seed + j,
            eos_id=service.tokenizer.eos_id,
            vocab_limit=min(service.tokenizer.vocab_size, service.model.config.vocab_size),
        )
    except ConfigError as e:
        raise invalid(str(e)) from None


def stop_strings(req: Sampling) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS:
        raise invalid(f"stop holds {len(stops)} strings; at most {MAX_STOPS}", "stop")
    if any(not s for s in stops):
        raise invalid("stop strings must not be empty", "stop")
    return stops


def check_model(service: Service, name: str) -> None:
    if name != service.model_id:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {service.model_id!r}",
            "model",
            "model_not_found",
        )


def prompt_ids(service: Service, prompt: object) -> list[list[int]]:
    """The prompt field (text, texts, ids, or lists of ids) -> each prompt's ids."""
    tokenizer = service.tokenizer
    vocab = min(tokenizer.vocab_size, service.model.config.vocab_size)  # ids it can decode
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise invalid("prompt is empty: give a string, a list of strings or of token ids", "prompt")
    if all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    rows = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            try:
                check_unicode(f"prompt[{i}]", item)
                rows.append(encode_prompt(tokenizer, item))
            except (ConfigError, ValueError) as e:
                raise invalid(str(e), "prompt") from None
            continue
        if not item:
            raise invalid(f"prompt[{i}] is an empty list of token ids", "prompt")
        bad = [x for x in item if not 0 <= x < vocab]
        if bad:
            raise invalid(f"prompt[{i}] holds {bad[0]}, not a token id in 0..{vocab - 1}", "prompt")
        rows.append(list(item))
    return rows


def check_choices(service: Service, count: int) -> None:
    """A request's sequences (prompts times n) must fit the slots and the queue at once."""
    room = service.config.max_batch + service.config.max_queue
    if count > room:
        raise invalid(
            f"the request asks for {count} sequences (prompts times n); this server takes at "
            f"most {room} at once (--max-batch plus --max-queue)",
            "n",
        )


def check_fits(service: Service, prompt: list[int], max_tokens: int, param: str) -> None:
    window = service.context_length
    if len(prompt) >= window:
        raise invalid(
            f"the prompt is {len(prompt)} tokens long but this model's context window holds "
            f"{window}: shorten the prompt to at most {window - 1} tokens",
            "prompt" if param == "max_tokens" else "messages",
            "context_length_exceeded",
        )
    if len(prompt) + max_tokens > window:
        raise invalid(
            f"the prompt ({len(prompt)} tokens) and {param} ({max_tokens}) add up to "
            f"{len(prompt) + max_tokens}, more than this model's context window holds "
            f"({window}): lower {param} to at most {window - len(prompt)}",
            param,
            "context_length_exceeded",
        )


def finish_reason(choice: Choice) -> str:
    if choice.finish_reason in (STOP, LENGTH):
        return choice.finish_reason
    raise APIError(503 if choice.finish_reason == CANCELLED else 500, choice.error or "cancelled")


def token_text(service: Service, token: int) -> tuple[str, list[int]]:
    """A token's text (U+FFFD for a part of a character) and its bytes."""
    tokenizer = service.tokenizer
    try:
        raw = tokenizer.decode_bytes([token])
    except (AttributeError, ValueError):
        raw = tokenizer.decode([token]).encode("utf-8")
    return raw.decode("utf-8", errors="replace"), list(raw)


# -- /v1/completions ---------------------------------------------------------------------


@dataclass
class CompletionPlan:
    req: CompletionRequest
    prompts: list[list[int]]
    batch: Batch


def plan_completion(service: Service, req: CompletionRequest) -> CompletionPlan:
    check_model(service, req.model)
    if req.suffix is not None:
        raise invalid("suffix is not supported by this server", "suffix")
    prompts = prompt_ids(service, req.prompt)
    check_choices(service, len(prompts) * req.n)
    stops = stop_strings(req)
    batch = Batch(service)
    for prompt in prompts:
        check_fits(service, prompt, req.max_tokens, "max_tokens")
        for j in range(req.n):
            batch.add(
                prompt,
                sampling_config(req, req.max_tokens, service, j),
                stops,
                logprobs=req.logprobs,
                prompt_logprobs=req.echo and req.logprobs is not None,
            )
    return CompletionPlan(req, prompts, batch)


def completion_logprobs(service: Service, choice: Choice, offset: int, echo: bool) -> dict:
    """OpenAI's legacy logprobs object: tokens, their log-probabilities, the top ones, and
    where each token's text starts. With echo the prompt's tokens come first, the first of
    them with null (nothing came before it)."""
    entries = list(choice.tokens)
    if echo and choice.prompt_logprobs is not None:
        entries = [*choice.prompt_logprobs, *entries]
    tokens, token_logprobs, top, offsets = [], [], [], []
    position = offset
    for entry in entries:
        text, _ = token_text(service, entry.id)
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        alternatives = {token_text(service, i)[0]: lp for i, lp in entry.top}
        top.append(alternatives if entry.logprob is not None else None)
        offsets.append(position)
        position += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


async def completions(service: Service, request: Request, req: CompletionRequest):
    plan = plan_completion(service, req)
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    prompt_texts = [service.tokenizer.decode(p) if req.echo else "" for p in plan.prompts]
    plan.batch.submit()
    watcher = asyncio.create_task(watch_disconnect(request, plan.batch))
    if req.stream:
        return StreamingResponse(
            stream_completion(service, plan, rid, created, prompt_texts, watcher),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        choices = await collect(plan.batch)
    finally:
        watcher.cancel()
    body_choices = []
    for index, choice in enumerate(choices):
        prompt_text = prompt_texts[index // req.n] if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(service, choice, 0, req.echo)
        body_choices.append(
            {
                "text": prompt_text + "".join(choice.text),
                "index": index,
                "logprobs": logprobs,
                "finish_reason": finish_reason(choice),
            }
        )
    return JSONResponse(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": service.model_id,
            "choices": body_choices,
            "usage": usage(plan.prompts, choices),
        }
    )


async def collect(batch: Batch) -> list[Choice]:
    choices = [Choice() for _ in batch.jobs]
    try:
        async for index, event in batch.events():
            absorb(choices[index], event)
    except asyncio.CancelledError:
        batch.cancel()
        raise
    return choices


def absorb(choice: Choice, event: Event) -> None:
    choice.text.append(event.text)
    choice.tokens.extend(event.tokens)
    if event.prompt_logprobs is not None:
        choice.prompt_logprobs = event.prompt_logprobs
    if event.finish_reason is not None:
        choice.finish_reason = event.finish_reason
        choice.completion_tokens = event.completion_tokens
        choice.error = event.error


def usage(prompts: list[list[int]], choices: list[Choice]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(c.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


@dataclass
class Chunks:
    """The server-sent events of one streamed response: `choice` for a choice's piece,
    `usage` for the last chunk (empty choices), asked for by stream_options.include_usage;
    then every chunk before it carries "usage": null, as OpenAI's do."""

    rid: str
    kind: str  # "text_completion" or "chat.completion.chunk"
    created: int
    model: str
    include_usage: bool

    def body(self, choices: list[dict]) -> dict:
        return {
            "id": self.rid,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def choice(self, choice: dict) -> str:
        body = self.body([choice])
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def usage(self, counts: dict) -> str:
        return sse({**self.body([]), "usage": counts})


def stream_error(choice: Choice) -> str:
    status = 503 if choice.finish_reason == CANCELLED else 500
    return sse(APIError(status, choice.error or "the request was cancelled").body())


async def stream_completion(service, plan, rid, created, prompt_texts, watcher):
    req = plan.req
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunks = Chunks(rid, "text_completion", created, service.model_id, include_usage)
    choices = [Choice() for _ in plan.batch.jobs]
    offsets = [0] * len(choices)

    def chunk(index: int, text: str, logprobs, reason) -> str:
        return chunks.choice(
            {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}
        )

    try:
        if req.echo:
            for index in range(len(choices)):
                yield chunk(index, prompt_texts[index // req.n], None, None)
        async for index, event in plan.batch.events():
            choice = choices[index]
            absorb(choice, event)
            if choice.finish_reason in (CANCELLED, ERROR):
                yield stream_error(choice)
                continue
            logprobs = None
            if req.logprobs is not None:  # offsets run over the tokens' texts, as unstreamed
                part = Choice(tokens=event.tokens, prompt_logprobs=event.prompt_logprobs)
                logprobs = completion_logprobs(service, part, offsets[index], req.echo)
                offsets[index] += sum(len(t) for t in logprobs["tokens"])
            reason = event.finish_reason
            if event.text or reason is not None or logprobs:
                yield chunk(index, event.text, logprobs, reason)
        if include_usage:
            yield chunks.usage(usage(plan.prompts, choices))
        yield sse("[DONE]")
    finally:
        watcher.cancel()
        plan.batch.cancel()  # a no-op for finished jobs; frees the slots of the others


# -- /v1/chat/completions ------------------------------------------------------------------


def chat_prompt(service: Service, req: ChatRequest) -> list[int]:
    """The messages rendered with the chat template, as ids. Special tokens' text in the
    rendering (the end-of-text a template puts after each assistant turn) becomes their
    ids, as transformers tokenizes a chat."""
    try:
        messages = check_messages([m.model_dump(exclude_none=True) for m in req.messages])
        for i, m in enumerate(messages):
            check_unicode(f"messages[{i}].content", m["content"])
        text = service.chat.render(messages, add_generation_prompt=True)
        ids = service.tokenizer.encode(text, allow_special=True)
        return ids or encode_prompt(service.tokenizer, text)
    except (ConfigError, ValueError) as e:
        raise invalid(str(e), "messages") from None


def plan_chat(service: Service, req: ChatRequest) -> tuple[list[int], Batch, int]:
    check_model(service, req.model)
    if req.tools:
        raise invalid("tools are not supported by this server", "tools")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise invalid('only response_format {"type": "text"} is supported', "response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    prompt = chat_prompt(service, req)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:
        check_fits(service, prompt, 1, "max_tokens")
        max_tokens = service.context_length - len(prompt)
    check_fits(service, prompt, max_tokens, param)
    check_choices(service, req.n)
    stops = stop_strings(req)
    batch = Batch(service)
    for j in range(req.n):
        batch.add(
            prompt,
            sampling_config(req, max_tokens, service, j),
            stops,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        )
    return prompt, batch, max_tokens


def chat_logprobs(service: Service, tokens: list[TokenLogprob]) -> dict:
    content = []
    for t in tokens:
        text, raw = token_text(service, t.id)
        top = []
        for i, lp in t.top:
            top_text, top_raw = token_text(service, i)
            top.append({"token": top_text, "logprob": lp, "bytes": top_raw})
        content.append({"token": text, "logprob": t.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content}


async def chat_completions(service: Service, request: Request, req: ChatRequest):
    prompt, batch, _ = plan_chat(service, req)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    batch.submit()
    watcher = asyncio.create_task(watch_disconnect(request, batch))
    if req.stream:
        return StreamingResponse(
            stream_chat(service, req, prompt, batch, rid, created, watcher),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        choices = await collect(batch)
    finally:
        watcher.cancel()
    body = []
    for index, choice in enumerate(choices):
        body.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": "".join(choice.text)},
                "logprobs": chat_logprobs(service, choice.tokens) if req.logprobs else None,
                "finish_reason": finish_reason(choice),
            }
        )
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": service.model_id,
            "choices": body,
            "usage": usage([prompt], choices),
        }
    )


async def stream_chat(service, req, prompt, batch, rid, created, watcher):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunks = Chunks(rid, "chat.completion.chunk", created, service.model_id, include_usage)
    choices = [Choice() for _ in batch.jobs]

    def chunk(index: int, delta: dict, logprobs, reason) -> str:
        return chunks.choice(
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        )

    try:
        for index in range(len(choices)):
            yield chunk(index, {"role": "assistant", "content": ""}, None, None)
        async for index, event in batch.events():
            choice = choices[index]
            absorb(choice, event)
            if choice.finish_reason in (CANCELLED, ERROR):
                yield stream_error(choice)
                continue
            logprobs = chat_logprobs(service, event.tokens) if req.logprobs else None
            if event.text or (logprobs and logprobs["content"]):
                yield chunk(index, {"content": event.text}, logprobs, None)
            if event.finish_reason is not None:
                yield chunk(index, {}, None, event.finish_reason)
        if include_usage:
            yield chunks.usage(usage([prompt], choices))
        yield sse("[DONE]")
    finally:
        watcher.cancel()
        batch.cancel()
