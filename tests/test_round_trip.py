"""benchmarks/round_trip.c, the cross-CPU round trip that benchmarks/host_speed.py reports."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).parents[1] / "benchmarks" / "round_trip.c"


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (cc)")
    binary = tmp_path_factory.mktemp("round_trip") / "round_trip"
    built = subprocess.run(
        [compiler, "-O2", "-Wall", "-Werror", "-pthread", "-o", str(binary), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    return binary


def run(binary, *args):
    return subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, timeout=30
    )


def test_a_round_trip_between_two_cpus_takes_a_positive_time(round_trip):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    done = run(round_trip, cpus[0], cpus[1], 20_000)
    assert done.returncode == 0, done.stderr
    ns = float(done.stdout)
    assert 0 < ns < 1e6  # a round trip of a cache line: nanoseconds, not a millisecond


def test_a_cpu_it_may_not_use_is_refused_without_hanging(round_trip):
    cpus = sorted(os.sched_getaffinity(0))
    missing = max(cpus) + 1000
    done = run(round_trip, cpus[0], missing, 10)
    assert done.returncode == 2 and f"cannot run on CPU {missing}" in done.stderr
    done = run(round_trip, missing, cpus[0], 10)
    assert done.returncode == 2 and f"cannot run on CPU {missing}" in done.stderr
    assert run(round_trip, cpus[0], cpus[0]).returncode == 2  # the usage
