"""The `tformer` program's start: a training run under jemalloc where it is installed."""

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from tformer.cli.launch import MALLOC_SETTINGS, STARTED, allocator_environment, put_back

JEMALLOC = "libjemalloc.so.2"


def installed():
    return JEMALLOC


def test_training_starts_again_under_jemalloc_keeping_freed_memory():
    env = allocator_environment(["train", "--data", "x"], {"PATH": "/bin"}, installed)
    saved = {"LD_PRELOAD": None, "MALLOC_CONF": None}
    assert env == {
        "PATH": "/bin",
        "LD_PRELOAD": JEMALLOC,
        "MALLOC_CONF": MALLOC_SETTINGS,
        STARTED: json.dumps(saved),
    }
    put_back(env)  # as the process started again does first
    assert env == {"PATH": "/bin"}


def test_the_users_preloads_and_jemalloc_settings_are_kept_and_put_back():
    environ = {"LD_PRELOAD": "/opt/libhook.so", "MALLOC_CONF": "narenas:1"}
    env = allocator_environment(["train"], environ, installed)
    assert env["LD_PRELOAD"] == f"{JEMALLOC} /opt/libhook.so"
    assert env["MALLOC_CONF"] == "narenas:1"
    put_back(env)
    assert env == environ


@pytest.mark.parametrize(
    ("argv", "environ", "find"),
    [
        (["generate", "run"], {}, installed),  # not measured: the C library's allocator
        (["train", "--help"], {}, installed),  # nothing to gain
        (["train"], {}, lambda: None),  # jemalloc not installed
        (["train"], {"TFORMER_ALLOCATOR": "system"}, installed),  # the user's choice
        (["train"], {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, installed),  # the user's
        (["train"], {STARTED: "{}"}, installed),  # started again already
    ],
)
def test_the_process_goes_on_as_it_is(argv, environ, find):
    assert allocator_environment(argv, environ, find) is None


def test_an_unknown_allocator_is_one_line_naming_the_variable_wherever_it_is_given():
    for find in (installed, lambda: None):
        with pytest.raises(SystemExit, match="TFORMER_ALLOCATOR='tcmalloc': choose one of"):
            allocator_environment(["train"], {"TFORMER_ALLOCATOR": "tcmalloc"}, find)


def test_no_library_is_looked_for_where_none_would_be_used():
    def fail():
        pytest.fail("looked for jemalloc")

    assert allocator_environment(["train"], {"TFORMER_ALLOCATOR": "system"}, fail) is None
    assert allocator_environment(["eval", "run"], {}, fail) is None


def run_python(code, *args):
    """`python -c code args` with no allocator settings of the caller's."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    env = {k: v for k, v in env.items() if not k.startswith("TFORMER_ALLOCATOR")}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, env=env
    )
    return out.stdout.splitlines()


needs_jemalloc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("jemalloc") is None,
    reason="jemalloc is not installed (apt-get install libjemalloc2)",
)


@needs_jemalloc
def test_the_process_runs_on_under_jemalloc_with_its_arguments_and_the_users_settings():
    """The same command line starts again (os.execve) with jemalloc loaded, once, and with
    the environment as it was for what it starts."""
    code = (
        "import os, sys\n"
        "from tformer.cli.launch import allocator_in_use, start_under_allocator\n"
        "print('started', sys.argv[1:], flush=True)\n"
        "start_under_allocator(['train'], own_command=True)\n"
        "print(allocator_in_use(), os.environ.get('LD_PRELOAD'), os.environ.get('MALLOC_CONF'))\n"
    )
    lines = run_python(code, "a", "b c")
    assert lines == ["started ['a', 'b c']", "started ['a', 'b c']", "jemalloc None None"]


@needs_jemalloc  # without it nothing would start again anyway
def test_a_caller_that_runs_tformer_in_process_is_not_started_again():
    """Only a process whose command line ends with the tformer arguments starts again."""
    code = (
        "import sys\n"
        "from tformer.cli.launch import allocator_in_use, start_under_allocator\n"
        "print('started', flush=True)\n"
        "start_under_allocator(['train'])\n"
        "print(allocator_in_use())\n"
    )
    assert run_python(code, "--other") == ["started", "system"]


def test_the_collector_is_off_while_the_modules_load_and_on_for_the_command(monkeypatch):
    """entry() loads the CLI with the garbage collector off, then hands main() a collector
    that is on and has nothing frozen (the trainer freezes the model and data itself,
    tformer.train.trainer.long_lived_objects_frozen, unless the caller froze objects)."""
    import gc

    import tformer.cli.launch as launch
    import tformer.cli.main

    seen = {}
    monkeypatch.setattr(sys, "argv", ["tformer", "generate"])
    monkeypatch.setattr(
        launch, "start_under_allocator", lambda argv: seen.update(start=gc.isenabled())
    )
    monkeypatch.setattr(
        tformer.cli.main, "entry", lambda: seen.update(main=(gc.isenabled(), gc.get_freeze_count()))
    )
    try:
        launch.entry()
    finally:
        gc.enable()
    assert seen == {"start": False, "main": (True, 0)}


def test_the_program_starts_without_loading_what_only_chat_templates_need():
    """jinja2 costs every command ~20 ms to load: only rendering a chat template loads it
    (tformer.generate.chat), not the CLI's start nor the SFT task's module."""
    code = (
        "import sys\n"
        "import tformer.cli.main, tformer.recipes.sft\n"
        "print('jinja2' in sys.modules)\n"
        "import tformer.generate.chat\n"
        "print('jinja2' in sys.modules)\n"
    )
    assert run_python(code) == ["False", "True"]
