"""The `tformer` program's start: a training run under jemalloc where it is installed."""

import ctypes.util
import subprocess
import sys

import pytest

from tformer.cli.launch import KEEP_FREED, allocator_environment

JEMALLOC = "libjemalloc.so.2"


def test_training_starts_again_under_jemalloc_keeping_freed_memory():
    env = allocator_environment(["train", "--data", "x"], {"PATH": "/bin"}, JEMALLOC)
    assert env == {"PATH": "/bin", "LD_PRELOAD": JEMALLOC, "MALLOC_CONF": KEEP_FREED}


def test_the_users_preloads_and_jemalloc_settings_are_kept():
    environ = {"LD_PRELOAD": "/opt/libhook.so", "MALLOC_CONF": "narenas:1"}
    env = allocator_environment(["train"], environ, JEMALLOC)
    assert env == {"LD_PRELOAD": f"{JEMALLOC} /opt/libhook.so", "MALLOC_CONF": "narenas:1"}


@pytest.mark.parametrize(
    ("argv", "environ", "library"),
    [
        (["generate", "run"], {}, JEMALLOC),  # not measured: the C library's allocator
        (["train", "--help"], {}, JEMALLOC),  # nothing to gain
        (["train"], {}, None),  # jemalloc not installed
        (["train"], {"TFORMER_ALLOCATOR": "system"}, JEMALLOC),  # the user's choice
        (["train"], {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, JEMALLOC),  # the user's
        (["train"], {"LD_PRELOAD": JEMALLOC}, JEMALLOC),  # started again already
    ],
)
def test_the_process_goes_on_as_it_is(argv, environ, library):
    assert allocator_environment(argv, environ, library) is None


def test_an_unknown_allocator_is_one_line_naming_the_variable():
    with pytest.raises(SystemExit, match="TFORMER_ALLOCATOR='tcmalloc': choose one of"):
        allocator_environment(["train"], {"TFORMER_ALLOCATOR": "tcmalloc"}, JEMALLOC)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("jemalloc") is None,
    reason="jemalloc is not installed (apt-get install libjemalloc2)",
)
def test_the_process_runs_on_under_jemalloc_with_its_arguments():
    """The same command line starts again (os.execve) with jemalloc loaded, once."""
    code = (
        "import sys\n"
        "from tformer.cli.launch import start_under_allocator\n"
        "print('started', sys.argv[1:], flush=True)\n"
        "start_under_allocator(['train'])\n"
        "print('jemalloc' in open('/proc/self/maps').read())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "a", "b c"], capture_output=True, text=True, check=True
    )
    lines = out.stdout.splitlines()
    assert lines == ["started ['a', 'b c']", "started ['a', 'b c']", "True"]
