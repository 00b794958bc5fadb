"""GPT-2 124M on the CPU at every precision: tformer against llama.cpp on the same weights.

One tformer checkpoint (GPT-2 124M, random weights: --checkpoint, made with `tformer init`
if missing) is exported with `tformer export gguf` as f32, bf16, q8_0 and q4_0, and both
engines run the same file's weights: llama.cpp the GGUF file, tformer the checkpoint packed
for decoding as float32, bfloat16, int8, and for q4_0 both int4 (weight-only) and w4a8
(int4's weights times activations rounded to int8 per 32, as llama.cpp multiplies q4_0 by
q8_0 activations); its own per-row int8, and q4_0's own 4-bit format; the q4_0 file and
tformer's 4-bit packings keep the output head in 8 bits. For each precision and packing,
the engines taking turns:

  decode      batch 1: llama-bench's tg256 (256 tokens from an empty context, no sampling)
              against tformer's greedy `stream_tokens` after `pack_for_decoding` and the
              kernels' row calibration `tformer generate` runs on its CPU, 256 new
              tokens after a 32-token prompt, timed from the first new token to the last
  prefill     512 tokens at once: llama-bench's pp512 against tformer's prefill of 512
  batch 8     aggregate new tokens/s of 8 sequences, 32-token prompts, 256 new tokens each:
              llama-batched-bench's S_TG against tformer's `generate_batch` (whole call,
              prompts included)

the engines taking turns for --repeats rounds (the order swapped each round), each
engine's best figure; and the memory-bandwidth ceiling of batch-1 decoding (bytes of
weights read per token, over a read bandwidth measured in the same run). llama.cpp's KV
cache is float16, tformer's float32.

It checks interoperability too: llama.cpp's greedy tokens (llama-server) on the exported f32
file equal tformer's on the checkpoint for 64 tokens on three prompts; and tformer's on a
file written by llama.cpp's own convert_hf_to_gguf.py (--convert-python) equal its own.

llama.cpp: the tree that the llama-cpp-python 0.3.36 sources ship (--llama-cpp, PEERS.md),
built once into --llama-build (the cache) with cmake if its programs are missing, with the
CPU's own instruction sets but not AMX (whose kernels crash on q8_0 there, PEERS.md).

    python benchmarks/llamacpp.py [--types f32,bf16,q8_0,q4_0] [--repeats 3] [--json]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from tformer import GPT2  # noqa: E402
from tformer.generate import SamplingConfig, generate_batch, generate_ids  # noqa: E402
from tformer.generate.decode import prefill, stream_tokens  # noqa: E402
from tformer.generate.fast import pack_for_decoding  # noqa: E402
from tformer.nn.packed_linear import calibrate_kernel_rows, packed_layers  # noqa: E402

CACHE = Path(os.environ.get("TFORMER_BENCH_CACHE", Path.home() / ".cache" / "tformer-bench"))
PEERS = Path("/root/peers")
LLAMA_CPP = PEERS / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
PROGRAMS = ("llama-bench", "llama-batched-bench", "llama-server")
# GGUF type -> tformer's packings of the same precision
TYPES = {
    "f32": ("float32",),
    "bf16": ("bfloat16",),
    "q8_0": ("int8",),
    "q4_0": ("int4", "w4a8"),
}
PROMPT, NEW, PREFILL, BATCH, CHECK_TOKENS = 32, 256, 512, 8, 64
# x86 flags in /proc/cpuinfo -> llama.cpp's cmake switches (AMX left out: PEERS.md)
CPU_SWITCHES = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
    "avx_vnni": "GGML_AVX_VNNI",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# llama.cpp: built once


def llama_programs(source: Path, build: Path, programs: tuple[str, ...] = PROGRAMS) -> Path:
    """The directory of llama.cpp's programs: --llama-build's, built there if missing."""
    bin_dir = build / "bin"
    if all((bin_dir / p).exists() for p in programs):
        return bin_dir
    if not (source / "CMakeLists.txt").exists():
        sys.exit(f"no llama.cpp source tree at {source} (see PEERS.md); pass --llama-cpp")
    flags = set(Path("/proc/cpuinfo").read_text().split("flags\t\t:")[1].split("\n")[0].split())
    switches = [f"-D{s}={'ON' if f in flags else 'OFF'}" for f, s in CPU_SWITCHES.items()]
    log(f"building llama.cpp into {build} (once; 10-15 minutes on 2 cores)")
    configure = ["cmake", "-S", str(source), "-B", str(build), "-DGGML_NATIVE=OFF", *switches,
                 "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DCMAKE_BUILD_TYPE=Release"]  # fmt: skip
    subprocess.run(configure, check=True, stdout=sys.stderr)
    jobs = str(os.cpu_count() or 1)
    subprocess.run(["cmake", "--build", str(build), "-j", jobs, "--target", *programs],
                   check=True, stdout=sys.stderr)  # fmt: skip
    return bin_dir


def llama_version(bin_dir: Path) -> str:
    done = subprocess.run([str(bin_dir / "llama-server"), "--version"], capture_output=True,
                          text=True)  # fmt: skip
    lines = (done.stdout + done.stderr).splitlines()
    return next((line for line in lines if line.startswith("version")), "version unknown")


def llama_bench(bin_dir: Path, model: Path, threads: int, repeats: int) -> tuple[float, float]:
    """(tg256 decode tok/s, pp512 prefill tok/s), llama-bench's averages over `repeats`."""
    command = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads),
               "-p", str(PREFILL), "-n", str(NEW), "-r", str(repeats), "-o", "json"]  # fmt: skip
    rows = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] == NEW)
    prompt = next(r["avg_ts"] for r in rows if r["n_prompt"] == PREFILL)
    return decode, prompt


def llama_batched(bin_dir: Path, model: Path, threads: int) -> float:
    """Aggregate generation tok/s of BATCH sequences (llama-batched-bench's S_TG)."""
    command = [str(bin_dir / "llama-batched-bench"), "-m", str(model), "-t", str(threads),
               "-c", str(BATCH * (PROMPT + NEW)), "-npp", str(PROMPT), "-ntg", str(NEW),
               "-npl", str(BATCH), "--output-format", "jsonl"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["speed_tg"]


@contextmanager
def llama_server(bin_dir: Path, model: Path, threads: int):
    """llama-server on a free port, the base URL while it runs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(bin_dir / "llama-server"), "-m", str(model), "-t", str(threads),
               "--host", "127.0.0.1", "--port", str(port), "-c", "1024"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            sys.exit(f"llama-server did not start on {model}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---------------------------------------------------------------------------------------
# tformer


def exported(checkpoint: Path, type_name: str) -> Path:
    """The checkpoint through `tformer export gguf`, cached beside it (redone if older)."""
    out = checkpoint.parent / f"{checkpoint.name}.tformer.{type_name}.gguf"
    weights = checkpoint / "model.safetensors"
    if not out.exists() or out.stat().st_mtime < weights.stat().st_mtime:
        log(f"tformer export gguf {checkpoint} --type {type_name}")
        command = [sys.executable, "-m", "tformer", "export", "gguf", str(checkpoint),
                   "--type", type_name, "--out", str(out), "--json"]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


def prompts(vocab: int, rows: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))


def tformer_figures(model: GPT2, repeats: int) -> dict:
    """Batch-1 decode, prefill of 512 and batch-8 aggregate tokens/s, each the best of
    `repeats`, for a model packed for decoding."""
    vocab = model.config.vocab_size
    greedy = SamplingConfig(max_new_tokens=NEW, do_sample=False)
    decode, prefilled, batched = 0.0, 0.0, 0.0
    with torch.inference_mode():
        for _ in range(repeats):
            stream = stream_tokens(model, prompts(vocab, 1, PROMPT), greedy)
            next(stream)  # the prompt's prefill and the first token
            start, count = time.perf_counter(), 0
            for _ in stream:
                count += 1
            decode = max(decode, count / (time.perf_counter() - start))

            caches = model.new_caches(1, max_len=PREFILL)
            long_prompt = prompts(vocab, 1, PREFILL)
            start = time.perf_counter()
            prefill(model, long_prompt, caches)
            prefilled = max(prefilled, PREFILL / (time.perf_counter() - start))

            rows = prompts(vocab, BATCH, PROMPT).tolist()
            start = time.perf_counter()
            out = generate_batch(model, rows, greedy)
            seconds = time.perf_counter() - start
            batched = max(batched, sum(len(r) for r in out) / seconds)
    return {"decode": decode, "prefill": prefilled, "batch8": batched}


def weight_bytes(model: GPT2) -> int:
    """Bytes of weights a decoding step reads: every packed layer's stored weights."""
    total = 0
    for layer in packed_layers(model).values():
        for buffer in (layer.panels, layer.weight, layer.scale, layer.group_scale):
            if buffer is not None:
                total += buffer.numel() * buffer.element_size()
    return total


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes/s of summing a 1 GiB float32 tensor on all threads: the read bandwidth."""
    data = torch.ones(2**28)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


# ---------------------------------------------------------------------------------------
# Interoperability


def check_interop(args, bin_dir: Path, checkpoint: Path, f32_file: Path) -> dict:
    model = GPT2.from_pretrained(checkpoint).eval()
    rows = prompts(model.config.vocab_size, 3, 16).tolist()
    greedy = SamplingConfig(max_new_tokens=CHECK_TOKENS, do_sample=False)
    ours = [generate_ids(model, row, greedy) for row in rows]
    theirs = []
    with llama_server(bin_dir, f32_file, args.threads) as url:
        for row in rows:
            body = {"prompt": row, "n_predict": CHECK_TOKENS, "temperature": 0, "top_k": 1,
                    "ignore_eos": True, "return_tokens": True, "cache_prompt": False}  # fmt: skip
            theirs.append(httpx.post(f"{url}/completion", json=body, timeout=120).json()["tokens"])
    agree = [_common_prefix(a, b) for a, b in zip(ours, theirs, strict=True)]
    result = {"llama_on_tformer_f32_file": agree}
    if args.convert_python.exists():
        from serve import gguf as converted  # llama.cpp's convert_hf_to_gguf.py, cached

        theirs_file = converted(checkpoint, "f32", args.convert_python, args.llama_cpp)
        loaded = GPT2.from_pretrained(theirs_file).eval()
        again = [generate_ids(loaded, row, greedy) for row in rows]
        result["tformer_on_converter_file"] = [
            _common_prefix(a, b) for a, b in zip(ours, again, strict=True)
        ]
    return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=CACHE / "gpt2-random",
        help="a GPT-2 checkpoint directory; made with random weights (tformer init) if absent",
    )
    parser.add_argument(
        "--types",
        default="f32,bf16,q8_0,q4_0",
        help="GGUF types to compare, comma-separated (q4_0 runs tformer's int4 and w4a8)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds the engines take in turns; best counts"
    )
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="threads for both engines"
    )
    parser.add_argument(
        "--llama-cpp", type=Path, default=LLAMA_CPP, help="llama.cpp's source tree (PEERS.md)"
    )
    parser.add_argument(
        "--llama-build",
        type=Path,
        default=CACHE / "llama.cpp-build",
        help="where llama.cpp is built (once, if its programs are missing)",
    )
    parser.add_argument(
        "--convert-python",
        type=Path,
        default=PEERS / "venv" / "bin" / "python",
        help="a Python with llama.cpp's gguf-py, torch and transformers (PEERS.md)",
    )
    parser.add_argument(
        "--skip-interop",
        action="store_true",
        help="skip the greedy-token checks against llama.cpp and its converter",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    args.types = args.types.split(",")
    unknown = set(args.types) - set(TYPES)
    if unknown:
        parser.error(f"--types: unknown {', '.join(sorted(unknown))}; choose from {list(TYPES)}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not (args.checkpoint / "config.json").exists():
        log(f"making GPT-2 124M with random weights in {args.checkpoint}")
        command = ["-m", "tformer", "init", str(args.checkpoint), "--preset", "gpt2",
                   "--dropout", "0", "--seed", "0"]  # fmt: skip
        subprocess.run([sys.executable, *command], check=True, stdout=sys.stderr)
    bin_dir = llama_programs(args.llama_cpp, args.llama_build)
    machine = f"{machine_line()} | llama.cpp {llama_version(bin_dir)}"
    log(machine)
    files = {t: exported(args.checkpoint, t) for t in args.types}
    rows, bandwidth = [], 0.0
    for type_name, packing in [(t, p) for t in args.types for p in TYPES[t]]:
        # probed again before each type, the best kept: one probe can fall in a slow moment
        bandwidth = max(bandwidth, read_bandwidth())
        log(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (best so far)")
        model = GPT2.from_pretrained(args.checkpoint).eval()
        pack_for_decoding(model, packing)
        # where torch's matmul overtakes the kernels on this CPU, as `tformer generate`
        # measures it (once a CPU, then cached): a batch of BATCH rows, a PREFILL prompt
        calibrate_kernel_rows(model, BATCH, cached=True, heads=("lm_head",))
        # the engines take turns, --repeats rounds, the order swapped each round; the best
        # figure of each engine counts (the host's speed drifts by 10-20% over minutes)
        llama_decode = llama_prefill = llama_batch = 0.0
        ours = {"decode": 0.0, "prefill": 0.0, "batch8": 0.0}
        for round_ in range(args.repeats):
            for engine in ("llama", "tformer") if round_ % 2 == 0 else ("tformer", "llama"):
                if engine == "llama":
                    decode, prompt = llama_bench(bin_dir, files[type_name], args.threads, 1)
                    batch = llama_batched(bin_dir, files[type_name], args.threads)
                    llama_decode, llama_prefill = (
                        max(llama_decode, decode),
                        max(llama_prefill, prompt),
                    )
                    llama_batch = max(llama_batch, batch)
                else:
                    figures = tformer_figures(model, 1)
                    ours = {k: max(v, figures[k]) for k, v in ours.items()}
        ours_bytes = weight_bytes(model)
        their_bytes = files[type_name].stat().st_size - 1024 * 768 * 4  # less positions
        row = {
            "type": type_name,
            "tformer": packing,
            "llama_decode": llama_decode,
            "tformer_decode": ours["decode"],
            "decode_ratio": ours["decode"] / llama_decode,
            "llama_prefill": llama_prefill,
            "tformer_prefill": ours["prefill"],
            "prefill_ratio": ours["prefill"] / llama_prefill,
            "llama_batch8": llama_batch,
            "tformer_batch8": ours["batch8"],
            "batch8_ratio": ours["batch8"] / llama_batch,
            "tformer_bytes": ours_bytes,
            "llama_bytes": their_bytes,
            "tformer_ceiling": bandwidth / ours_bytes,
            "llama_ceiling": bandwidth / their_bytes,
        }
        rows.append(row)
        log(
            f"{type_name:>5} / {packing:<8} decode {llama_decode:6.1f} vs "
            f"{ours['decode']:6.1f} tok/s ({row['decode_ratio']:.2f}x; ceilings "
            f"{row['llama_ceiling']:.0f} / {row['tformer_ceiling']:.0f}) | prefill "
            f"{llama_prefill:6.0f} vs {ours['prefill']:6.0f} ({row['prefill_ratio']:.2f}x) | "
            f"batch 8 {llama_batch:6.1f} vs {ours['batch8']:6.1f} ({row['batch8_ratio']:.2f}x)"
        )
        del model
    interop = None
    if not args.skip_interop and "f32" in files:
        interop = check_interop(args, bin_dir, args.checkpoint, files["f32"])
        log(f"greedy tokens in agreement (of {CHECK_TOKENS}): {interop}")
    for row in rows:  # every ceiling from the best bandwidth of the run
        row["tformer_ceiling"] = bandwidth / row["tformer_bytes"]
        row["llama_ceiling"] = bandwidth / row["llama_bytes"]
    same_file(rows)
    print_table(machine, bandwidth, rows)
    if args.json:
        print(json.dumps({"machine": machine, "read_bandwidth": bandwidth, "rows": rows,
                          "interop": interop}))  # fmt: skip


def same_file(rows: list[dict]) -> None:
    """One llama.cpp figure per file: where tformer ran the same type two ways (q4_0 as int4
    and w4a8), llama.cpp took turns with each, and its best over all those rounds counts
    for both rows, their ratios recomputed."""
    for measure in ("decode", "prefill", "batch8"):
        best = {}
        for row in rows:
            best[row["type"]] = max(best.get(row["type"], 0.0), row[f"llama_{measure}"])
        for row in rows:
            row[f"llama_{measure}"] = best[row["type"]]
            row[f"{measure}_ratio"] = row[f"tformer_{measure}"] / best[row["type"]]


def print_table(machine: str, bandwidth: float, rows: list[dict]) -> None:
    log(f"\n{machine}; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    log("| type | decode llama.cpp | tformer | ratio | ceiling llama / tformer | prefill 512 "
        "llama.cpp | tformer | ratio | batch 8 llama.cpp | tformer | ratio |")  # fmt: skip
    log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [
            f"{r['type']} / {r['tformer']}",
            f"{r['llama_decode']:.1f}",
            f"{r['tformer_decode']:.1f}",
            f"{r['decode_ratio']:.2f}x",
            f"{r['llama_ceiling']:.0f} / {r['tformer_ceiling']:.0f}",
            f"{r['llama_prefill']:.0f}",
            f"{r['tformer_prefill']:.0f}",
            f"{r['prefill_ratio']:.2f}x",
            f"{r['llama_batch8']:.1f}",
            f"{r['tformer_batch8']:.1f}",
            f"{r['batch8_ratio']:.2f}x",
        ]
        log("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
