import platform

import pytest
import torch

from tformer.devices import keep_freed_memory, pick_device, training_dtype


def test_keep_freed_memory_takes_effect_on_glibc_and_can_be_repeated():
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is on_glibc
    assert keep_freed_memory() is on_glibc
    x = torch.randn(1024, 1024)  # 4 MB: from the heap now, not a fresh mapping
    del x
    assert torch.ones(2048, 1024).sum().item() == 2048 * 1024


def test_device_and_dtype_choices_explain_what_is_wrong():
    assert pick_device("cpu") == torch.device("cpu")
    assert training_dtype("float32", torch.device("cpu")) == "float32"
    with pytest.raises(ValueError, match="float16 training needs a CUDA GPU"):
        training_dtype("float16", torch.device("cpu"))


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as a machine with two GPUs shows it (their bf16: `native`, a list to
    change), for the choices made before any GPU work."""
    native = [True]

    def capability(device=None) -> tuple[int, int]:
        return (9, 0) if native[0] else (7, 0)  # an H100, or a V100 (bf16 only emulated)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    return native


def test_auto_takes_float16_on_a_gpu_without_native_bfloat16(two_gpus):
    cuda = torch.device("cuda")
    assert training_dtype("auto", cuda) == "bfloat16"
    two_gpus[0] = False  # a V100 or T4: bf16 only emulated
    assert training_dtype("auto", cuda) == "float16"
    with pytest.raises(ValueError, match="no native bfloat16"):
        training_dtype("bfloat16", cuda)


def test_a_gpu_that_is_not_there_is_named(two_gpus, monkeypatch):
    from tformer.train import distributed

    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'cuda:2' asked for, but PyTorch sees 2 GPU\(s\)"):
        pick_device("cuda:2")
    # torchrun's third process on this two-GPU machine: refused before joining any group
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set_device"))
    with pytest.raises(ValueError, match="local rank 2 .* sees 2 GPU.*--nproc_per_node"):
        distributed.init_from_env(torch.device("cuda"))


HUGE_PAGES_CHECK = """
import ctypes, os
import torch
from tformer.cli.launch import withhold_huge_pages
from tformer.devices import HUGE_PAGES_FROM, HUGE_PAGES_WITHHELD, allow_huge_pages

def withheld():
    return ctypes.CDLL(None).prctl(42, 0, 0, 0, 0)  # PR_GET_THP_DISABLE

print(withheld())
print(withhold_huge_pages(True), withheld())
print(withhold_huge_pages(True))  # withheld already, as if on purpose: not changed
small = torch.nn.Linear(100, 100)
large = torch.nn.Linear(2000, HUGE_PAGES_FROM // 2000)  # HUGE_PAGES_FROM weights + a bias
print(allow_huge_pages(large), withheld())  # not marked as tformer's doing: left alone
os.environ[HUGE_PAGES_WITHHELD] = "1"  # as tformer train's start marks it
print(allow_huge_pages(small), withheld())
print(allow_huge_pages(large), withheld(), HUGE_PAGES_WITHHELD in os.environ)
print(allow_huge_pages(large), withheld())  # nothing left to allow
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="transparent huge pages are Linux's")
def test_huge_pages_withheld_at_the_start_are_allowed_for_a_large_model_only():
    import subprocess
    import sys

    # in a process of its own: the setting is the process's, and lasts
    run = subprocess.run([sys.executable, "-c", HUGE_PAGES_CHECK], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split("\n")
    if lines[0] != "0":  # no such prctl here (-1), or this process was started without them
        pytest.skip(f"PR_GET_THP_DISABLE gave {lines[0]}")
    assert lines[1:7] == ["True 1", "False", "False 1", "False 1", "True 0 False", "False 0"]
