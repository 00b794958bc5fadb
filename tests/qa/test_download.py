"""`tformer data squad`: fetched over HTTP (from a server on 127.0.0.1 here), checked, cached."""

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest


def squad_json(questions: int) -> dict:
    context = "The king lived in Paris. The queen lived in Rome."
    qas = [
        {
            "id": f"q{i}",
            "question": "Where did the queen live?",
            "answers": [{"text": "Rome", "answer_start": context.index("Rome")}],
        }
        for i in range(questions)
    ]
    return {
        "version": "1.1",
        "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}],
    }


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/site; yields its base URL."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield site, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def tformer(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "tformer", *map(str, args)], capture_output=True, text=True, env=env
    )


def test_squad_downloads_into_the_cache_and_trains(server, tmp_path):
    site, url = server
    (site / "train-v1.1.json").write_text(json.dumps(squad_json(12)))
    (site / "dev-v1.1.json").write_text(json.dumps(squad_json(3)))
    env = {**os.environ, "TFORMER_CACHE": str(tmp_path / "cache")}
    result = tformer("data", "squad", "--base-url", url, "--json", env=env)
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout.strip().splitlines()[-1])
    assert paths["train"] == str(tmp_path / "cache" / "squad" / "train-v1.1.json")
    assert json.loads(Path(paths["dev"]).read_text()) == squad_json(3)
    assert [p.name for p in (tmp_path / "cache" / "squad").iterdir()] != []
    assert not list((tmp_path / "cache" / "squad").glob(".*"))  # no temporaries left

    options = ["--task", "qa", "--data", "squad", "--steps", "2", "--n-layers", "1"]
    options += ["--n-heads", "2", "--d-model", "16", "--context", "96", "--stride", "16"]
    options += ["--batch-size", "2", "--dtype", "float32", "--json", "--out", tmp_path / "run"]
    trained = tformer("train", *options, env=env)
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout.strip().splitlines()[-1])["questions"] == 3  # dev


def test_a_closed_network_or_a_bad_file_is_a_clear_error(server, tmp_path):
    site, url = server
    env = {**os.environ, "TFORMER_CACHE": str(tmp_path / "cache")}
    missing = tformer("data", "squad", "--base-url", url, env=env)  # nothing served: 404
    assert missing.returncode == 2
    assert "could not download SQuAD 1.1 train" in missing.stderr
    assert "--train/--val" in missing.stderr  # how to pass a local copy instead
    (site / "train-v1.1.json").write_text("<html>a login page</html>")
    bad = tformer("data", "squad", "--base-url", url, env=env)
    assert bad.returncode == 2 and "did not give SQuAD JSON" in bad.stderr
    assert not (tmp_path / "cache" / "squad" / "train-v1.1.json").exists()
    untrained = tformer(
        "train", "--task", "qa", "--data", "squad", "--out", tmp_path / "r", env=env
    )
    assert untrained.returncode == 2 and "tformer data squad --version 1.1" in untrained.stderr
