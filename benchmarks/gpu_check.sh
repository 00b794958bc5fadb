#!/usr/bin/env bash
# The GPU check: one command, run once on a lent machine with one CUDA GPU, from the
# repository's root, with the wheels of benchmarks/gpu_wheels.sh carried in .whl/
# (docs/GPU.md says how to call it):
#
#     bash benchmarks/gpu_check.sh
#
# It writes under $OUT (the folder whose files come back; /tmp/gpu-check where OUT is not
# set), six files of the eight allowed:
#   env.log      nvidia-smi, versions, the wheels installed, the C kernels' build,
#                lint-imports and ruff
#   tests.log    the test suite's output: every test file, failures and all, until the
#                suite ends or its time is up
#   tests.xml    the same as JUnit XML (where pytest lived to write it)
#   gpu.log      benchmarks/gpu.py's figures, as it printed them
#   gpu.json     the same as one JSON object
#   summary.txt  one line per part: how it ended and how long it took
# The parts run one after another, whatever the ones before did. Each has a time cap, and
# the whole ends by DEADLINE seconds (530: under the command's 570 s limit), keeping
# BENCH_SECONDS of them for the benchmark whatever the tests take. (GPU_ARGS adds options to
# gpu.py's: `GPU_ARGS="--device cpu --small"` for a dry run of this script on a CPU.)
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
DEADLINE=${DEADLINE:-530}
BENCH_SECONDS=${BENCH_SECONDS:-180}
TEST_SECONDS=${TEST_SECONDS:-300}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
: >"$OUT/summary.txt"

left() { echo $((DEADLINE - SECONDS)); }
# ended NAME STATUS STARTED: one line of summary.txt (124: killed by `timeout`)
ended() {
    local how="exit $2"
    [[ $2 == 124 || $2 == 137 ]] && how="TIMED OUT (exit $2)"
    echo "$1: $how after $((SECONDS - $3)) s" | tee -a "$OUT/summary.txt"
}

# 1. The environment: the carried wheels first, each unless this machine has the same
# version or a newer one (an older one is shadowed: /tmp/site comes first on the path).
started=$SECONDS
{
    echo "== wheels"
    wheels=$(
        python3 - <<'EOF'
import importlib.metadata as metadata
import pathlib
import sys

from packaging.version import Version

for wheel in sorted(pathlib.Path(".whl").glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have is not None and Version(have) >= Version(version):
        print(f"kept this machine's {name} {have} (carried: {version})", file=sys.stderr)
        continue
    print(f"installing {name} {version} (this machine: {have or 'none'})", file=sys.stderr)
    print(wheel)
EOF
    )
    if [[ -n $wheels ]]; then
        # shellcheck disable=SC2086  # one path a word
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" $wheels
        echo "pip install: exit $?"
    fi
    if [[ -f .whl/data/gpt2.tiktoken ]]; then  # GPT-2's BPE ranks, where a run looks first
        mkdir -p "$HOME/.cache/tformer" && cp .whl/data/gpt2.tiktoken "$HOME/.cache/tformer/"
    fi
} >"$OUT/env.log" 2>&1
export PYTHONPATH="$PWD/src:$SITE" PATH="$SITE/bin:$PATH"
# Offline: what would try the network fails at once instead of after its timeouts.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# One build of the C kernels for the whole run, the tests' processes included.
export TFORMER_KERNELS_DIR="$HOME/.cache/tformer/kernels"
{
    echo "== machine"
    nvidia-smi
    nproc
    free -g
    df -h /tmp | tail -1
    cc --version | head -1
    echo "== versions"
    python3 - <<'EOF'
import importlib.metadata as metadata
import sys

import torch

print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
names = (
    "transformers peft safetensors tokenizers tiktoken numpy pytest pytest-xdist pytest-timeout "
    "hypothesis fastapi starlette pydantic uvicorn openai httpx gguf bm25s num2words pysword "
    "ruff import-linter anyio typing-extensions"
)
for name in names.split():
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "MISSING")
EOF
    echo "== imports"
    python3 - <<'EOF'
import importlib

modules = (
    "tformer.serve.app tformer.qa.retrieval tformer.data.bible tformer.data.parallel "
    "tformer.models.gpt2_gguf openai bm25s gguf pysword num2words"
)
for name in modules.split():
    try:
        importlib.import_module(name)
        print(name, "ok")
    except Exception as error:  # each one's failure, and on to the next
        print(name, "FAILED:", type(error).__name__, error)
EOF
} >>"$OUT/env.log" 2>&1
ended environment 0 "$started"

# 2. The C kernels, compiled once here with the machine's cc (-march=native): slow or
# failing, the tests and the benchmark run on torch's kernels instead (TFORMER_KERNELS=0).
started=$SECONDS
timeout -k 5 150 python3 -c "
from tformer import kernels
print('kernels:', 'built' if kernels.load() is not None else kernels.unavailable_reason())
" >>"$OUT/env.log" 2>&1
status=$?
ended "kernels build" "$status" "$started"
if ((status != 0)); then
    export TFORMER_KERNELS=0
    echo "kernels: switched off (TFORMER_KERNELS=0) for what follows" | tee -a "$OUT/summary.txt"
fi

# 3. The floors' import contracts and the linter: quick, and in the Makefile's test target.
started=$SECONDS
{
    echo "== lint-imports"
    timeout -k 5 60 lint-imports
    echo "exit $?"
    echo "== ruff"
    timeout -k 5 30 ruff check . && timeout -k 5 30 ruff format --check .
    echo "exit $?"
} >>"$OUT/env.log" 2>&1
ended "lint-imports, ruff" 0 "$started"

# 4. The test suite on 8 workers, a file to a worker (the Makefile's --dist loadfile), all of
# it (no -x), each test capped where pytest-timeout is there, the whole capped by `timeout`.
started=$SECONDS
budget=$(($(left) - BENCH_SECONDS))
((budget > TEST_SECONDS)) && budget=$TEST_SECONDS
if ((budget < 60)); then
    echo "tests: skipped, $budget s left for them" | tee -a "$OUT/summary.txt"
else
    options=(-q -n 8 --dist loadfile --tb=short -p no:cacheprovider --junitxml="$OUT/tests.xml")
    # --timeout from pytest-timeout 1.0, --session-timeout (ends the run in order, with its
    # summary and tests.xml) from 2.3
    timeouts=$(python3 -c "
import importlib.metadata as metadata
from packaging.version import Version
try:
    have = Version(metadata.version('pytest-timeout'))
except metadata.PackageNotFoundError:
    have = None
print('' if have is None else '--timeout=120' + (' --session-timeout=$((budget - 30))' if have >= Version('2.3') else ''))
" 2>/dev/null)
    # shellcheck disable=SC2206  # the options, a word each
    options+=($timeouts)
    # Two OpenMP threads for each of the 8 workers on 16 cores, waiting threads soon asleep
    # (the Makefile's reason for GOMP_SPINCOUNT).
    OMP_NUM_THREADS=2 GOMP_SPINCOUNT=10000 timeout -k 15 "$budget" \
        python3 -m pytest "${options[@]}" 2>&1 | tee "$OUT/tests.log"
    ended "tests (cap $budget s)" "${PIPESTATUS[0]}" "$started"
fi

# 5. The benchmark: training and decoding, tformer against transformers.
started=$SECONDS
budget=$(($(left) - 5))
((budget < 60)) && budget=60
# shellcheck disable=SC2086  # GPU_ARGS: options, a word each
timeout -k 10 "$budget" python3 benchmarks/gpu.py --json ${GPU_ARGS:-} >"$OUT/gpu.json" \
    2>"$OUT/gpu.log"
ended "benchmark (cap $budget s)" $? "$started"

echo "== summary"
cat "$OUT/summary.txt"
echo "== the tests' last lines"
tail -n 40 "$OUT/tests.log" 2>/dev/null
echo "== benchmark"
cat "$OUT/gpu.log"
