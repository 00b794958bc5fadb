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
