"""Real servers for the tests: `python -m tformer serve` in a subprocess on 127.0.0.1 and a
free port, on tiny checkpoints made here."""

import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tformer.cli.main import main
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from tformer.tokenizers import CharTokenizer, load_tokenizer

UNICODE_WORDS = ["日本語", "中文", "🙂", "🎉", "字符", "テキスト", "é", "ü", "Ω", "✓"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def wait_idle(self, seconds: float = 5.0) -> float:
        """tformer_slots_busy once it reads 0, or after `seconds`."""
        deadline = time.monotonic() + seconds
        while (busy := self.metric("tformer_slots_busy")) and time.monotonic() < deadline:
            time.sleep(0.02)
        return busy


@contextmanager
def serving(checkpoint: Path, *options: str, log_dir: Path):
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    command = [sys.executable, "-m", "tformer", "serve", str(checkpoint), "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, *options], stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()}")
            try:
                if httpx.get(f"{server.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide GPT-2 with random weights and GPT-2's tokenizer, window 128."""
    out = tmp_path_factory.mktemp("serve") / "tiny"
    main(["init", str(out), "--n-layers", "2", "--d-model", "32", "--n-heads", "2",
          "--max-len", "128", "--seed", "3"])  # fmt: skip
    return out


@pytest.fixture(scope="session")
def slow_lm(tmp_path_factory) -> Path:
    """Wide and deep enough (4 x 256, window 1024) that a long request takes seconds: time
    for a test to act while it runs."""
    out = tmp_path_factory.mktemp("serve-slow") / "slow"
    main(["init", str(out), "--n-layers", "4", "--d-model", "256", "--n-heads", "4",
          "--max-len", "1024"])  # fmt: skip
    return out


@pytest.fixture(scope="session")
def unicode_lm(tmp_path_factory) -> Path:
    """GPT-2's tokenizer, a few steps on Chinese, Japanese and emoji text: its tokens split
    characters between them, as byte-level BPE does."""
    root = tmp_path_factory.mktemp("serve-unicode")
    rng = random.Random(0)
    text = root / "u.txt"
    text.write_text(" ".join(rng.choice(UNICODE_WORDS) for _ in range(6000)), encoding="utf-8")
    out = root / "run"
    main(["train", "--data", str(text), "--tokenizer", "gpt2", "--n-layers", "1",
          "--d-model", "32", "--n-heads", "2", "--context", "32", "--steps", "40",
          "--batch-size", "8", "--lr", "0.02", "--sample-tokens", "0",
          "--out", str(out)])  # fmt: skip
    return out


@pytest.fixture(scope="session")
def lm_server(tiny_lm, tmp_path_factory):
    with serving(tiny_lm, "--max-batch", "8", log_dir=tmp_path_factory.mktemp("logs")) as s:
        yield s


@pytest.fixture
def start_server(tmp_path):
    """start_server(checkpoint, *options): a context manager serving it, as `serving`."""
    return lambda checkpoint, *options: serving(checkpoint, *options, log_dir=tmp_path)


@pytest.fixture(scope="session")
def serve_session(tmp_path_factory):
    """start_server for fixtures that outlive one test."""
    logs = tmp_path_factory.mktemp("serve-logs")
    return lambda checkpoint, *options: serving(checkpoint, *options, log_dir=logs)


@pytest.fixture(scope="session")
def translator(tmp_path_factory):
    """An encoder-decoder with random weights and a character tokenizer (window 32)."""
    out = tmp_path_factory.mktemp("serve-translation") / "translator"
    # ids 0, 1, 2 are the model's pad, start and end tokens: no letter of a sentence
    tokenizer = CharTokenizer(["\x00", "\x01", "\x02", *sorted(set("abcdefghijklmnopqrstuvwxyz "))])
    config = Seq2SeqConfig(
        tokenizer.vocab_size,
        tokenizer.vocab_size,
        max_len=32,
        d_model=32,
        n_heads=2,
        n_encoder_layers=1,
        n_decoder_layers=1,
        d_ff=64,
        share_embeddings=True,
    )
    Seq2SeqTransformer(config, seed=0).save_pretrained(out)
    tokenizer.save(out)
    return out


@pytest.fixture(scope="session")
def reader(tiny_lm, tmp_path_factory):
    """The tiny GPT-2 with a new span head, saved as a question-answering checkpoint."""
    out = tmp_path_factory.mktemp("serve-qa") / "reader"
    GPT2ForQuestionAnswering.from_pretrained(tiny_lm, seed=0).save_pretrained(out)
    load_tokenizer(tiny_lm).save(out)
    return out


@pytest.fixture(scope="module")
def translation_server(translator, serve_session):
    # its tests compare with translations and answers computed on the CPU in process
    with serve_session(translator, "--device", "cpu") as server:
        yield server


@pytest.fixture(scope="module")
def reader_server(reader, serve_session):
    with serve_session(reader, "--device", "cpu") as server:
        yield server
