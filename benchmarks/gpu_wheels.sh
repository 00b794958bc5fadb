#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.sh installs on the lent GPU machine, downloaded here
# into .whl/ (ignored by git: .git/info/exclude), for CPython 3.12 on manylinux x86_64.
#
# That machine has no network and lacks what tformer and its tests need beyond torch,
# transformers and the test runner: num2words, pysword, bm25s, fastapi (Starlette, pydantic),
# uvicorn, gguf, openai, ruff, import-linter, and the dependencies of these that it may not
# have. The versions are those this repository's .venv runs (pyproject.toml's ranges); a
# dependency the machine already has at the same or a newer version is left to it there
# (gpu_check.sh decides, wheel by wheel). Run from anywhere:
#
#     bash benchmarks/gpu_wheels.sh          (LIMIT_MIB=50: the folder's cap, see below)
#
# The carried folder travels with the working tree (at most 64 MiB in all), so the two
# large ones, ctranslate2 and playwright, come only if the folder stays under LIMIT_MIB with
# them: the tests that need them skip without them (ctranslate2 by importorskip; the
# playground's browser tests need a Chromium that machine lacks anyway). pytest-timeout is
# not a dependency of tformer: it gives the check its per-test timeout.
# GPT-2's BPE ranks (tformer.tokenizers.gpt2_ranks_file, 0.8 MB) are copied from this
# machine's cache too, where there: offline, the tests that tokenise with GPT-2 would
# otherwise fail after trying the network.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=${LIMIT_MIB:-50}

NEEDED=(
    # tformer's own dependencies that the machine lacks
    num2words==0.5.14 bm25s==0.3.16 gguf==0.19.0
    fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.3
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 anyio==4.16.0 idna==3.21 sniffio==1.3.1
    uvicorn==0.55.0 click==8.5.1 h11==0.16.0
    # the tests'
    openai==3.63.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 jiter==0.19.0
    ruff==0.17.6 import-linter==2.17 grimp==3.20 rich==15.0.0 markdown-it-py==4.3.0
    mdurl==0.1.2 pygments==2.21.0
    pytest-timeout==2.4.0
)
# Pure Python published as source archives only: built into wheels here (py3-none-any).
# (docopt: num2words's one dependency, which only its command-line program imports.)
SOURCE_ONLY=(pysword==0.2.8 docopt==0.6.2)
LARGE=(ctranslate2==4.8.5 playwright==1.65.3)

download() {  # download DIRECTORY REQUIREMENT...
    local folder=$1
    shift
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$folder" "$@"
}

mebibytes() { du -sm "$1" | cut -f1; }

mkdir -p "$DEST"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
for requirement in "${NEEDED[@]}"; do
    download "$DEST" "$requirement"
done

for requirement in "${SOURCE_ONLY[@]}"; do
    "$PYTHON" -m pip wheel --quiet --no-deps -w "$DEST" "$requirement"
done

# Each large wheel is fetched aside, weighed, and kept only if the folder stays in its cap.
for requirement in "${LARGE[@]}"; do
    aside=$(mktemp -d)
    download "$aside" "$requirement"
    size=$(mebibytes "$aside")
    if (($(mebibytes "$DEST") + size <= LIMIT_MIB)); then
        mv "$aside"/*.whl "$DEST"/
        echo "kept $requirement ($size MiB)"
    else
        echo "left out $requirement ($size MiB): the folder would pass $LIMIT_MIB MiB"
    fi
    rm -rf "$aside"
done

ranks=${TFORMER_CACHE:-$HOME/.cache/tformer}/gpt2.tiktoken
if [[ -f $ranks ]]; then
    mkdir -p "$DEST/data"
    cp "$ranks" "$DEST/data/gpt2.tiktoken"
fi

ls -l "$DEST" "$DEST/data" 2>/dev/null
echo "$DEST: $(find "$DEST" -name '*.whl' | wc -l) wheels, $(mebibytes "$DEST") MiB in all"
