"""SQuAD 1.1 and 2.0 (Rajpurkar et al., 2016; 2018), downloaded once into tformer's cache.

The files are the official ones, as the SQuAD site serves them:

    BASE_URL/train-v1.1.json, dev-v1.1.json, train-v2.0.json, dev-v2.0.json

Each is streamed to a temporary file, parsed as SQuAD JSON (tformer.qa.squad), and only then
renamed into `cache/squad/`, so a cut connection or an error page never leaves a file
that looks like data. Where the network is closed, the error says how to pass a copy of the
files instead (--data, or --train and --val).
"""

import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tqdm import tqdm

from tformer.files import cache_dir
from tformer.qa.squad import read_qa_file

BASE_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"
VERSIONS = {"1.1": "v1.1", "2.0": "v2.0"}
SPLITS = ("train", "dev")


def squad_dir() -> Path:
    return cache_dir() / "squad"


def squad_paths(version: str) -> dict[str, Path]:
    """Where the cache keeps a version's files: {"train": ..., "dev": ...}."""
    if version not in VERSIONS:
        raise ValueError(f"SQuAD versions: {', '.join(VERSIONS)}; got {version!r}")
    return {split: squad_dir() / f"{split}-{VERSIONS[version]}.json" for split in SPLITS}


def cached_squad(version: str) -> dict[str, Path]:
    """The cached files of a version, or an error that says how to get them."""
    paths = squad_paths(version)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"SQuAD {version} is not in the cache ({', '.join(missing)}): run 'tformer data "
            f"squad --version {version}', or pass your copy with --train TRAIN.json --val "
            "DEV.json"
        )
    return paths


def download_squad(
    version: str = "1.1", base_url: str = BASE_URL, progress: bool = True
) -> dict[str, Path]:
    """Download a version's train and dev files into the cache (those not there yet)."""
    paths = squad_paths(version)
    for split, path in paths.items():
        if path.is_file():
            continue
        url = base_url.rstrip("/") + "/" + path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp.json")
        try:
            fetch(url, tmp, f"{split} {version}", progress)
            count = len(read_qa_file(tmp))  # refuse what is not SQuAD before it is kept
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, urllib.error.URLError) as e:
            reason = getattr(e, "reason", None) or e
            raise OSError(
                f"could not download SQuAD {version} {split} from {url} ({reason}). Without "
                f"network access, copy {path.name} from a machine that has it and pass it "
                "with --train/--val (or --data) to 'tformer train --task qa', or put it at "
                f"{path}"
            ) from None
        except ValueError as e:
            raise ValueError(f"{url} did not give SQuAD JSON: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        if progress:
            print(f"{path}: {count:,} questions", flush=True)
    return paths


def fetch(url: str, destination: Path, label: str, progress: bool) -> None:
    """Stream `url` into `destination`, with a progress bar."""
    with urllib.request.urlopen(url, timeout=30) as response, open(destination, "wb") as out:
        size = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=size, unit="B", unit_scale=True, desc=label, disable=not progress) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
