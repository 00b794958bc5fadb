"""Serving GPT-2 124M to streaming clients: `tformer serve` against llama.cpp's `llama-server`.

The model is GPT-2 124M with random weights, made once with `tformer init` (--checkpoint,
default ~/.cache/tformer-bench/gpt2-random) and converted for llama.cpp with llama.cpp's own
convert_hf_to_gguf.py (run by --convert-python from --llama-cpp) into GGUF files cached next
to it (gpt2-random.f32.gguf, gpt2-random.bf16.gguf). Both servers load the same weights.
The peer, as in PEERS.md: --llama-server is built from the llama.cpp tree that the
llama-cpp-python 0.3.36 sources ship (--llama-cpp); --convert-python is a separate venv with
`pip install torch numpy transformers sentencepiece` and `pip install -e LLAMA_CPP/gguf-py`.

Load: N clients (--clients 1,4,16,64) each send `POST /v1/completions` back to back, streaming
(a 32-word prompt drawn from a fixed word list with a seeded RNG, different per request and
the same for every server; max_tokens 128, temperature 0, no stop, stream_options
include_usage), all starting together, for --seconds. Per (server, precision, clients):

- tokens/s: completion tokens received inside the window / window. A request finished
  inside it counts its usage.completion_tokens (its content chunks if no usage came); a
  request still streaming at the end of the window is cut there and counts its content
  chunks so far (a chunk may carry two tokens when a character's bytes span them);
- TTFT, time to first token: request sent -> first non-empty text chunk. A request still
  waiting for its first token at the end of the window is held until that token comes (at
  most --grace s, then it counts as unanswered), so every request sent has a TTFT;
- ITL, inter-token latency: gaps between consecutive text chunks inside the window;
- errors: a status other than 200, a broken connection, a stream ending without [DONE].

One server runs at a time (the host has few CPUs); each point starts its own servers with as
many slots as clients: llama-server `--parallel N`, tformer `--max-batch N` (--tformer-max-batch
fixes it), and tformer `--max-batch 1` (one request at a time) as the baseline of batching.
The servers take turns point by point (llama-server, tformer, tformer --max-batch 1, next
point) so that they see the same phases of a drifting host. Each row records
`cpus`, how many CPUs the server, this client and other programs kept busy on average; on
a 2-CPU host any other program spoils the figures (a warning says so). Before each
point, one request per client of 8 tokens warms the server up. Goals checked at the end:
tformer's tokens/s at least 1.5x llama-server's at 16 and 64 clients in the same precision,
p99 TTFT no worse than llama-server's, at least 4x tformer --max-batch 1 at 16 clients, zero
errors.

--soak: 64 clients for 60 s against one tformer server (--soak-server llama for reference),
where the clients drop a fraction of their requests mid-stream (close the connection after
1 to 20 chunks; the rest are cut at the end), and one more client sends a malformed request
every --bad-every s, kind after kind (bad JSON, wrong types, negative max_tokens, unknown
model, no prompt, a prompt longer than the context). Passes if no answer is a 5xx, every
kind of malformed request was sent and got a 4xx, well-formed requests see no errors, the
server's resident memory after warm-up (the first 10 s; sampled every second, with its
children) grows by at most --rss-tolerance, every slot is free at the end (/metrics gauge
tformer_slots_busy; llamacpp:requests_processing for llama-server), the server still answers
a request, and tformer exits 0 on SIGTERM.

    python benchmarks/serve.py [--clients 1,4,16,64] [--precisions f32,bf16]
                               [--servers llama,tformer,tformer-b1] [--seconds 60] [--json]
    python benchmarks/serve.py --soak [--soak-seconds 60] [--json]
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

PEERS = Path("/root/peers")
LLAMA_CPP = PEERS / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
PROMPT_WORDS, NEW_TOKENS, WARMUP_TOKENS = 32, 128, 8
TORCH_DTYPE = {"f32": "float32", "bf16": "bfloat16"}
SERVER_NAMES = {"llama": "llama-server", "tformer": "tformer", "tformer-b1": "tformer mb=1"}
BUSY_GAUGE = {"tformer": "tformer_slots_busy", "llama": "llamacpp:requests_processing"}
# A fixed word list: every prompt is 32 of these, drawn with a seeded RNG.
WORD_LIST = (
    "the of and to in is was for on with as by at from his that it he which this be are an "
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "river city house water night story light music garden window letter train market "
    "winter summer morning evening mountain ocean forest road bridge village king queen "
    "small large old new good great long little early young important public bad same able "
    "walk talk write read open close begin carry bring follow build learn remember travel"
)
WORDS = WORD_LIST.split()


def prompt_for(client: int, k: int) -> str:
    """The k-th prompt of client `client`: 32 words, the same on every server."""
    rng = random.Random(client * 100_003 + k)
    return " ".join(rng.choice(WORDS) for _ in range(PROMPT_WORDS))


def completion_body(model: str, prompt: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# ---------------------------------------------------------------------------------------
# The weights: one tformer checkpoint, converted once per precision for llama.cpp.


def checkpoint(directory: Path) -> Path:
    if not (directory / "config.json").exists():
        print(f"making GPT-2 124M with random weights in {directory}", file=sys.stderr)
        command = ["-m", "tformer", "init", str(directory), "--preset", "gpt2", "--dropout", "0"]
        subprocess.run([sys.executable, *command, "--seed", "0"], check=True, stdout=sys.stderr)
    return directory


def gguf(ckpt: Path, precision: str, convert_python: Path, llama_cpp: Path) -> Path:
    """ckpt converted by llama.cpp's converter, cached next to it (redone if older)."""
    out = ckpt.parent / f"{ckpt.name}.{precision}.gguf"
    weights = ckpt / "model.safetensors"
    if out.exists() and out.stat().st_mtime >= weights.stat().st_mtime:
        return out
    print(f"converting {ckpt} to {out}", file=sys.stderr)
    script = llama_cpp / "convert_hf_to_gguf.py"
    command = [str(convert_python), str(script), str(ckpt), "--outtype", precision]
    done = subprocess.run([*command, "--outfile", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"conversion failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return out


# ---------------------------------------------------------------------------------------
# Servers: a subprocess, ready when GET /health answers 200, stopped with SIGTERM.


@dataclass
class Server:
    kind: str  # "llama" or "tformer"
    process: subprocess.Popen
    url: str
    model: str = ""
    exit_code: int | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args: argparse.Namespace, server: str, precision: str, slots: int) -> list:
    """The command line of one server, on a free port, with `slots` requests at a time."""
    port = free_port()
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if server == "llama":
        model = gguf(args.checkpoint, precision, args.convert_python, args.llama_cpp)
        size = ["-c", str(slots * 1024), "-np", str(slots), "--metrics"]
        return [str(args.llama_server), "-m", str(model), "-t", str(args.threads), *host, *size]
    batch = 1 if server == "tformer-b1" else (args.tformer_max_batch or slots)
    serve = [sys.executable, "-m", "tformer", "serve", str(args.checkpoint), *host]
    size = ["--max-batch", str(batch), "--threads", str(args.threads)]
    return [*serve, *size, "--dtype", TORCH_DTYPE[precision]]


@contextmanager
def running(
    kind: str, command: list, log_dir: Path, ready_seconds: float = 300
) -> Iterator[Server]:
    port = command[command.index("--port") + 1]
    log_path = log_dir / f"{kind}-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = Server(kind, process, f"http://127.0.0.1:{port}")
    try:
        give_up = time.monotonic() + ready_seconds
        while not ready(server):
            if process.poll() is not None or time.monotonic() > give_up:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{' '.join(command)} did not start:\n{tail}")
            time.sleep(0.2)
        server.model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            server.exit_code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            server.exit_code = process.wait()


def ready(server: Server) -> bool:
    try:
        return httpx.get(server.url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------------------------------
# One streamed request, timed chunk by chunk.


@dataclass
class Request:
    sent: float
    arrivals: list[float] = field(default_factory=list)  # each non-empty text chunk
    usage_tokens: int | None = None
    done: bool = False  # saw data: [DONE]
    ended: float = float("inf")  # when [DONE] came
    cut: bool = False  # closed by us: end of window, or a deliberate drop
    status: int | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.sent if self.arrivals else None

    def tokens_by(self, deadline: float) -> int:
        if self.usage_tokens is not None and self.ended <= deadline:
            return self.usage_tokens
        return sum(t <= deadline for t in self.arrivals)


async def stream_request(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    cut_at: float,
    first_token_by: float,
    drop_after: int | None = None,
) -> Request:
    """POST body and read its event stream until [DONE]; cut it at `cut_at` once a token
    has come (before: at `first_token_by`), or after `drop_after` text chunks."""
    loop = asyncio.get_running_loop()
    r = Request(sent=loop.time())
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            r.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                r.error = f"HTTP {response.status_code}"
                return r
            lines = response.aiter_lines()
            while not r.done:
                limit = (cut_at if r.arrivals else first_token_by) - loop.time()
                try:
                    line = await asyncio.wait_for(lines.__anext__(), max(limit, 0))
                except (asyncio.TimeoutError, StopAsyncIteration) as stop:
                    r.cut = isinstance(stop, asyncio.TimeoutError)
                    break
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    r.done, r.ended = True, loop.time()
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    r.usage_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or [{}]
                if choices[0].get("text"):
                    r.arrivals.append(loop.time())
                    if drop_after is not None and len(r.arrivals) >= drop_after:
                        r.cut = True
                        break
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as e:
        r.error = f"{type(e).__name__}: {e}"[:200]
    if not (r.done or r.cut or r.error):
        r.error = "stream ended without [DONE]"
    return r


def new_client(connections: int, longest_wait: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections + 8, max_keepalive_connections=connections)
    timeout = httpx.Timeout(10.0, read=longest_wait)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


# ---------------------------------------------------------------------------------------
# A load point: N clients back to back for a fixed time.


async def warm_up(server: Server, clients: int) -> None:
    async with new_client(clients, 300) as client:
        end = asyncio.get_running_loop().time() + 300
        body = completion_body(server.model, prompt_for(10_000, 0), WARMUP_TOKENS)
        rs = await asyncio.gather(
            *(stream_request(client, server.url, body, end, end) for _ in range(clients))
        )
    if all(r.error for r in rs):
        raise RuntimeError(f"{server.url}: every warm-up request failed: {rs[0].error}")


class CpuMeter:
    """CPUs kept busy on average since it was made: by the server, by this client, by the
    rest of the host (on a 2-CPU host any other program spoils the figures: llama.cpp's
    threads wait for each other spinning and decode ten times slower when a CPU is taken)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.read()

    def read(self) -> tuple[float, float, float, float]:
        """(now, seconds all CPUs were busy, the server's CPU seconds, this process's)."""
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        host = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait (steal counts)
        server = int(fields[11]) + int(fields[12])  # utime, stime
        tick = os.sysconf("SC_CLK_TCK")
        return time.monotonic(), host / tick, server / tick, time.process_time()

    def cpus(self) -> dict[str, float]:
        (t0, host0, server0, client0), (t1, host1, server1, client1) = self.start, self.read()
        server, client = server1 - server0, client1 - client0
        others = host1 - host0 - server - client
        return {
            k: round(v / (t1 - t0), 2)
            for k, v in {"server": server, "client": client, "others": max(others, 0.0)}.items()
        }


async def load(server: Server, clients: int, seconds: float, grace: float) -> dict:
    loop = asyncio.get_running_loop()
    requests: list[Request] = []
    start = loop.time()
    deadline = start + seconds

    async def one_client(c: int, client: httpx.AsyncClient) -> None:
        k = 0
        while loop.time() < deadline:
            body = completion_body(server.model, prompt_for(c, k), NEW_TOKENS)
            r = await stream_request(client, server.url, body, deadline, deadline + grace)
            requests.append(r)
            k += 1
            if r.error:
                await asyncio.sleep(0.05)  # a failing server must not be flooded

    meter = CpuMeter(server.process.pid)
    async with new_client(clients, seconds + grace) as client:
        await asyncio.gather(*(one_client(c, client) for c in range(clients)))
    return {**summary(requests, start, deadline), "cpus": meter.cpus()}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    i = (len(s) - 1) * q / 100
    lo = int(i)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def summary(requests: list[Request], start: float, deadline: float) -> dict:
    ttft = [r.ttft for r in requests if r.ttft is not None]
    itl = [
        b - a
        for r in requests
        for a, b in zip(r.arrivals, r.arrivals[1:], strict=False)
        if b <= deadline
    ]
    completed = [r for r in requests if r.done]
    tokens = sum(r.tokens_by(deadline) for r in requests)
    per_completed = sum(r.tokens_by(float("inf")) for r in completed) / max(len(completed), 1)
    ms = lambda x: None if x is None else round(x * 1000, 1)  # noqa: E731
    return {
        "tokens_per_s": round(tokens / (deadline - start), 1),
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "itl_p50_ms": ms(percentile(itl, 50)),
        "itl_p99_ms": ms(percentile(itl, 99)),
        "requests": len(requests),
        "completed": len(completed),
        "unanswered": sum(r.ttft is None and not r.error for r in requests),
        "errors": sum(r.error is not None for r in requests),
        "error_examples": sorted({r.error for r in requests if r.error})[:3],
        "tokens_per_completed": round(per_completed, 1) if completed else None,
    }


# ---------------------------------------------------------------------------------------
# The comparison: every point, servers taking turns, then the goals.


def measure(args: argparse.Namespace, log_dir: Path) -> list[dict]:
    rows = []
    for precision in args.precisions:
        for clients in args.clients:
            for server in args.servers:
                command = server_command(args, server, precision, clients)
                kind = "llama" if server == "llama" else "tformer"
                with running(kind, command, log_dir) as live:
                    asyncio.run(warm_up(live, clients))
                    row = asyncio.run(load(live, clients, args.seconds, args.grace))
                row = {"server": server, "precision": precision, "clients": clients, **row}
                row["exit_code"] = live.exit_code
                rows.append(row)
                print_row(row)
    return rows


def print_row(row: dict) -> None:
    def cell(value: float | None, width: int) -> str:
        return f"{'-' if value is None else value:>{width}}"

    print(
        f"{SERVER_NAMES[row['server']]:13} {row['precision']:5} {row['clients']:>3} clients "
        f"{row['tokens_per_s']:7.1f} tok/s  TTFT p50/p99 {cell(row['ttft_p50_ms'], 7)}"
        f"/{cell(row['ttft_p99_ms'], 7)} ms  ITL p50/p99 {cell(row['itl_p50_ms'], 6)}"
        f"/{cell(row['itl_p99_ms'], 6)} ms  requests {row['requests']:>4} "
        f"(completed {row['completed']}, unanswered {row['unanswered']}) "
        f"errors {row['errors']}  CPUs {json.dumps(row['cpus'])}",
        file=sys.stderr,
        flush=True,
    )
    if row["cpus"]["others"] > 0.1:
        print(f"  warning: other programs kept {row['cpus']['others']} CPUs busy", file=sys.stderr)


def goals(rows: list[dict]) -> list[dict]:
    """The target's goals for every pair of points measured in this run."""
    at = {(r["server"], r["precision"], r["clients"]): r for r in rows}
    out = []

    def check(name: str, value: float | None, target: float, higher_is_better: bool) -> None:
        ok = value is not None and (value >= target if higher_is_better else value <= target)
        out.append({"goal": name, "value": value, "target": target, "pass": ok})

    for (server, precision, clients), row in at.items():
        if server != "tformer":
            continue
        peer = at.get(("llama", precision, clients))
        if peer and clients in (16, 64):
            check(
                f"tok/s vs llama-server, {precision}, {clients} clients",
                ratio(row["tokens_per_s"], peer["tokens_per_s"]),
                1.5,
                True,
            )
        if peer:
            check(
                f"p99 TTFT / llama-server's, {precision}, {clients} clients",
                ratio(row["ttft_p99_ms"], peer["ttft_p99_ms"]),
                1.0,
                False,
            )
        alone = at.get(("tformer-b1", precision, clients))
        if alone and clients == 16:
            check(
                f"tok/s vs --max-batch 1, {precision}, {clients} clients",
                ratio(row["tokens_per_s"], alone["tokens_per_s"]),
                4.0,
                True,
            )
    tformer_errors = sum(r["errors"] for r in rows if r["server"] != "llama")
    check("tformer errors, all points", tformer_errors, 0, False)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


# ---------------------------------------------------------------------------------------
# The soak: dropped streams and malformed requests under full load, memory, slots.

MALFORMED = (
    "bad-json",
    "wrong-types",
    "negative-max-tokens",
    "unknown-model",
    "no-prompt",
    "huge-prompt",
)


async def malformed(client: httpx.AsyncClient, server: Server, kind: str) -> int | None:
    """Send one malformed request; its status (None if the connection broke)."""
    body = completion_body(server.model, prompt_for(0, 0), NEW_TOKENS)
    if kind == "wrong-types":
        body.update(prompt={"text": 1}, max_tokens="many")
    elif kind == "negative-max-tokens":
        body["max_tokens"] = -5
    elif kind == "unknown-model":
        body["model"] = "no-such-model"
    elif kind == "no-prompt":
        del body["prompt"]
    elif kind == "huge-prompt":  # far longer than the 1,024-token context
        body["prompt"] = " ".join(WORDS[i % len(WORDS)] for i in range(20_000))
    content = b'{"model": "x", "prompt": "unfinished' if kind == "bad-json" else None
    try:
        url = server.url + "/v1/completions"
        if content is not None:
            headers = {"content-type": "application/json"}
            response = await client.post(url, content=content, headers=headers)
        else:
            response = await client.post(url, json=body)
        return response.status_code
    except httpx.HTTPError:
        return None


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (psutil, else /proc)."""
    try:
        import psutil

        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except ImportError:
        with open(f"/proc/{pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb * 1024


def slots_busy(server: Server) -> float | None:
    """The server's busy-slot gauge from /metrics (summed over its label sets)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = [
        float(line.rsplit(None, 1)[1])
        for line in text.splitlines()
        if line.split("{")[0].split(" ")[0] == BUSY_GAUGE[server.kind]
    ]
    return sum(values) if values else None


async def soak_load(server: Server, args: argparse.Namespace) -> tuple[dict, list[tuple]]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + args.soak_seconds
    normal: list[Request] = []
    dropped: list[Request] = []
    bad: dict[str, list] = {kind: [] for kind in MALFORMED}
    rss: list[tuple[float, int]] = []

    async def one_client(c: int, client: httpx.AsyncClient) -> None:
        rng, k = random.Random(c), 0
        while loop.time() < end:
            body = completion_body(server.model, prompt_for(c, k), NEW_TOKENS)
            drop = rng.randint(1, 20) if rng.random() < args.drop_fraction else None
            r = await stream_request(client, server.url, body, end, end, drop)
            k += 1
            (normal if drop is None else dropped).append(r)
            if r.error:
                await asyncio.sleep(0.05)

    async def send_malformed(client: httpx.AsyncClient) -> None:
        i = 0
        while loop.time() < end:
            kind = MALFORMED[i % len(MALFORMED)]
            bad[kind].append(await malformed(client, server, kind))
            i += 1
            await asyncio.sleep(args.bad_every)

    async def sample_memory() -> None:
        while loop.time() < end:
            rss.append((loop.time() - start, rss_bytes(server.process.pid)))
            await asyncio.sleep(1.0)

    async with new_client(args.soak_clients, args.grace) as client:
        clients = (one_client(c, client) for c in range(args.soak_clients))
        await asyncio.gather(sample_memory(), send_malformed(client), *clients)
    counts = {
        "normal": summary(normal, start, end),
        "dropped": len(dropped),
        "dropped_errors": sum(r.error is not None for r in dropped),
        "malformed_status": {kind: statuses(codes) for kind, codes in bad.items()},
        "status_5xx": sum((r.status or 0) >= 500 for r in normal + dropped)
        + sum((code or 0) >= 500 for codes in bad.values() for code in codes),
    }
    return counts, rss


async def still_answers(server: Server) -> bool:
    """Whether one short request, with time to spare, streams to its end."""
    async with new_client(1, 120) as client:
        end = asyncio.get_running_loop().time() + 120
        body = completion_body(server.model, prompt_for(20_000, 0), WARMUP_TOKENS)
        r = await stream_request(client, server.url, body, end, end)
    return r.done and r.error is None


def print_soak(outcome: dict) -> None:
    normal, memory = outcome["normal"], outcome["rss_mib_after_warmup"]
    lines = [
        f"soak: {SERVER_NAMES[outcome['server']]} {outcome['precision']}, "
        f"{outcome['clients']} clients, {outcome['seconds']:g} s",
        f"well-formed: {normal['requests']} requests, {normal['completed']} completed, "
        f"{normal['errors']} errors, {normal['tokens_per_s']} tok/s, "
        f"TTFT p50/p99 {normal['ttft_p50_ms']}/{normal['ttft_p99_ms']} ms",
        f"dropped mid-stream: {outcome['dropped']} ({outcome['dropped_errors']} errors)",
        f"malformed: {json.dumps(outcome['malformed_status'])}",
        f"5xx answers: {outcome['status_5xx']}; CPUs busy: {json.dumps(outcome['cpus'])}",
        f"RSS after warm-up (MiB): {json.dumps(memory)}",
        f"slots busy at the end: {outcome['slots_busy_at_end']}, exit code {outcome['exit_code']}",
        *(f"{'pass' if ok else 'FAIL'}  {name}" for name, ok in outcome["criteria"].items()),
        f"soak: {'PASS' if outcome['pass'] else 'FAIL'}",
    ]
    print("\n".join(lines), file=sys.stderr)


def statuses(codes: list[int | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for code in codes:
        out[str(code)] = out.get(str(code), 0) + 1
    return out


def soak(args: argparse.Namespace, log_dir: Path) -> dict:
    precision, clients = args.precisions[0], args.soak_clients
    command = server_command(args, args.soak_server, precision, clients)
    with running(args.soak_server, command, log_dir) as server:
        asyncio.run(warm_up(server, clients))
        meter = CpuMeter(server.process.pid)
        counts, rss = asyncio.run(soak_load(server, args))
        cpus = meter.cpus()
        slots = slots_busy(server)
        for _ in range(20):  # a cancelled request may take a decoding step to let go
            if slots is not None and slots == 0:
                break
            time.sleep(0.5)
            slots = slots_busy(server)
        answers = asyncio.run(still_answers(server))
    mib = [round(b / 2**20, 1) for t, b in rss if t >= args.soak_warmup]
    memory = {"first": mib[0], "min": min(mib), "max": max(mib), "last": mib[-1]} if mib else {}
    malformed_ok = all(
        kinds and all(code.startswith("4") for code in kinds)
        for kinds in counts["malformed_status"].values()
    )
    criteria = {
        "no 5xx": counts["status_5xx"] == 0,
        "malformed requests (every kind) get 4xx": malformed_ok,
        "no errors on well-formed requests": counts["normal"]["errors"] == 0
        and counts["dropped_errors"] == 0,
        f"RSS after {args.soak_warmup:g} s grows at most {args.rss_tolerance:.0%}": bool(mib)
        and mib[-1] <= mib[0] * (1 + args.rss_tolerance),
        "every slot free at the end": slots == 0,
        "still answers afterwards": answers,
    }
    if args.soak_server == "tformer":
        criteria["exits 0 on SIGTERM"] = server.exit_code == 0
    return {
        "server": args.soak_server,
        "precision": precision,
        "clients": clients,
        "seconds": args.soak_seconds,
        "drop_fraction": args.drop_fraction,
        "malformed_every_s": args.bad_every,
        **counts,
        "rss_mib_after_warmup": memory,
        "rss_mib_all": [(round(t, 1), round(b / 2**20, 1)) for t, b in rss],
        "slots_busy_at_end": slots,
        "cpus": cpus,
        "exit_code": server.exit_code,
        "criteria": criteria,
        "pass": all(criteria.values()),
    }


# ---------------------------------------------------------------------------------------


def comma_list(choices: tuple | None = None, kind: type = str):
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v]
        wrong = [v for v in values if choices is not None and v not in choices]
        if wrong or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return values

    return parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Paths default to the peers' place on this VM (/root/peers, see PEERS.md).",
    )
    add = parser.add_argument
    add("--clients", type=comma_list(kind=int), default=[1, 4, 16, 64], help="1,4,16,64")
    add("--precisions", type=comma_list(tuple(TORCH_DTYPE)), default=["f32", "bf16"])
    add(
        "--servers",
        type=comma_list(tuple(SERVER_NAMES)),
        default=list(SERVER_NAMES),
        help="llama,tformer,tformer-b1 (tformer-b1: tformer serve --max-batch 1)",
    )
    add(
        "--seconds",
        type=float,
        default=60.0,
        help="length of each point's window (at 64 clients one request takes about 30 s)",
    )
    add(
        "--grace",
        type=float,
        default=60.0,
        help="how long a request sent in the window may wait for its first token",
    )
    add("--tformer-max-batch", type=int, help="tformer's --max-batch (default: the clients)")
    add(
        "--checkpoint",
        type=Path,
        default=Path.home() / ".cache/tformer-bench/gpt2-random",
        help="the tformer checkpoint; made with `tformer init --preset gpt2` if missing",
    )
    add(
        "--llama-server",
        type=Path,
        default=LLAMA_CPP / "build/bin/llama-server",
        help="llama-server binary",
    )
    add(
        "--llama-cpp",
        type=Path,
        default=LLAMA_CPP,
        help="llama.cpp source tree (for convert_hf_to_gguf.py)",
    )
    add(
        "--convert-python",
        type=Path,
        default=PEERS / "venv/bin/python",
        help="a Python with torch, numpy, transformers and llama.cpp's gguf-py installed",
    )
    add(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="llama-server -t, tformer serve --threads",
    )
    add("--soak", action="store_true", help="run the soak instead of the comparison")
    add("--soak-server", choices=("tformer", "llama"), default="tformer")
    add("--soak-seconds", type=float, default=60.0)
    add("--soak-clients", type=int, default=64)
    add("--soak-warmup", type=float, default=10.0, help="seconds before RSS is judged")
    add("--drop-fraction", type=float, default=0.2, help="requests dropped mid-stream")
    add("--bad-every", type=float, default=0.5, help="seconds between malformed requests")
    add("--rss-tolerance", type=float, default=0.05, help="allowed RSS growth after warm-up")
    add("--json", action="store_true", help="print everything as one JSON object on stdout")
    args = parser.parse_args()
    uses_llama = "llama" in args.servers if not args.soak else args.soak_server == "llama"
    if uses_llama and not args.llama_server.is_file():
        parser.error(f"--llama-server {args.llama_server}: no such file (build it, PEERS.md)")
    if uses_llama and not args.convert_python.is_file():
        parser.error(f"--convert-python {args.convert_python}: no such file")
    args.checkpoint = args.checkpoint.expanduser()
    return args


def llama_version(binary: Path) -> str:
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    lines = (done.stdout + done.stderr).splitlines()
    return next((line for line in lines if line.startswith("version")), "unknown")


def main() -> None:
    args = parse_args()
    machine = machine_line()
    print(machine, file=sys.stderr)
    checkpoint(args.checkpoint)
    result: dict = {"machine": machine, "checkpoint": str(args.checkpoint)}
    if args.soak_server == "llama" if args.soak else "llama" in args.servers:
        result["llama_server"] = llama_version(args.llama_server)
        print(f"llama-server {result['llama_server']}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as logs:
        if args.soak:
            result["soak"] = soak(args, Path(logs))
            print_soak(result["soak"])
        else:
            settings = {
                "prompt_words": PROMPT_WORDS,
                "max_tokens": NEW_TOKENS,
                "seconds": args.seconds,
                "threads": args.threads,
            }
            result.update(settings=settings, rows=measure(args, Path(logs)))
            result["goals"] = goals(result["rows"])
            for goal in result["goals"]:
                verdict = "pass" if goal["pass"] else "FAIL"
                print(
                    f"{verdict}  {goal['goal']}: {goal['value']} (target {goal['target']})",
                    file=sys.stderr,
                )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
