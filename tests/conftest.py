import os
import random

import pytest
import torch

from tformer.files import cache_dir

# The compiled kernels are built once for the whole suite, in the folder a tformer run here
# builds them in: tests and the processes they start keep private caches (for tokens,
# corpora and timed choices), and each would otherwise compile the C sources anew, 6-11 s on
# two cores. A library's name is a hash of its sources, compiler, flags and CPU, so a shared
# one is the one each would build.
os.environ.setdefault("TFORMER_KERNELS_DIR", str((cache_dir() / "kernels").resolve()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_measured_choices(tmp_path_factory, monkeypatch):
    """Choices timed on this CPU (tformer.nn.measured) are kept in a folder of the test's
    own, and none is remembered from another test: no test reads what another one timed,
    or writes to the user's cache."""
    from tformer.nn import measured

    folder = tmp_path_factory.mktemp("measured")
    monkeypatch.setattr(measured, "choices_file", lambda kind: folder / f"{kind}.json")
    monkeypatch.setattr(measured, "_chosen", {})


@pytest.fixture(scope="module")
def compiled():
    """The compiled kernels; the test is skipped where they are not built."""
    from tformer import kernels

    library = kernels.load()
    if library is None:
        pytest.skip(f"the compiled kernels are not built here: {kernels.unavailable_reason()}")
    return library


@pytest.fixture(params=[False, True], ids=["float32 products", "bf16 pairs"])
def pairs(request, compiled) -> bool:
    """Whether the short attention kernel under test multiplies bf16 pairs
    (kernels/attention_pairs.c) rather than float32 values (kernels/attention.c); the pairs
    are skipped on a CPU without AVX-512 BF16, where that kernel is not built."""
    if request.param and not compiled.attention_pairs_available():
        pytest.skip("the bf16 pairs' attention kernel needs a CPU with AVX-512 BF16")
    return request.param


@pytest.fixture(scope="session")
def tiny_text() -> str:
    """A few thousand characters with structure a tiny model learns in a few dozen steps."""
    rng = random.Random(0)
    subjects = ["the cat", "a dog", "my friend", "the king", "our queen"]
    verbs = ["sees", "likes", "follows", "greets", "hears"]
    objects = ["the moon", "a bird", "the river", "its shadow", "the sea"]
    lines = [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(400)
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus_file(tmp_path, monkeypatch, tiny_text):
    """The tiny text in a file, with a private tformer cache for its tokens."""
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(tiny_text, encoding="utf-8")
    return path


@pytest.fixture
def tied_sums(monkeypatch):
    """A list that gets, for each backward pass of nn/embedding.py's SumTiedGradients,
    whether it summed the lookup's rows into the head's own gradient in place."""
    from tformer.nn import embedding

    in_place = []
    original = embedding.SumTiedGradients.backward

    def spied(ctx, grad_head, grad_lookup):
        out = original(ctx, grad_head, grad_lookup)
        in_place.append(out[0] is grad_head and grad_lookup is not None)
        return out

    monkeypatch.setattr(embedding.SumTiedGradients, "backward", staticmethod(spied))
    return in_place
