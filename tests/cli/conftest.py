import os

import pytest

from tformer.cli.main import main


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A randomly initialised 2-layer, 32-wide GPT-2 checkpoint with its tokenizer."""
    out = tmp_path_factory.mktemp("ckpt")
    main(
        [
            "init",
            str(out),
            "--n-layers",
            "2",
            "--d-model",
            "32",
            "--n-heads",
            "2",
            "--max-len",
            "64",
        ]
    )
    return out


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "TFORMER_CACHE": str(tmp_path / "cache")}


@pytest.fixture
def corpus(corpus_file):
    return corpus_file
