"""Checking a value at the boundary: a number in its range, one of a set of choices.

Every check raises ConfigError naming the value and what it may be, e.g.

    temperature must be a finite number > 0, got nan
    top_k must be an integer >= 1, got 2.5

The config dataclasses call these in __post_init__, so the Python API and the command line
(whose flags parse with `parse_number`) say the same thing.
"""

import math
import numbers
from collections.abc import Iterable
from typing import Any

from tformer.errors import ConfigError

# The largest seed: torch.Generator.manual_seed takes a signed 64-bit one.
MAX_SEED = 2**63 - 1


def describe_range(
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> str:
    """What a number may be, in words: "an integer >= 1", "a finite number in (0, 1]"."""
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f"{kind} in {left}{bound(low)}, {bound(high)}{right}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {bound(low)}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {bound(high)}"
    return kind


def bound(value: float) -> str:
    """A range's end as text: an integer exactly (a seed's 9223372036854775807, not
    9.22337e+18), a whole float without its ".0" (1, not 1.0), another in Python's shortest
    form (0.1, 1e-08)."""
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if float(value).is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(float(value))


def number_problem(
    value: Any,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> str | None:
    """None if `value` is such a number, else what it must be: "must be an integer >= 1"
    (no name, nothing of the value).

    Integers are any numbers.Integral (Python's int, numpy's int64), other numbers any
    numbers.Real (float, numpy's float32); bools are neither here, and neither are NaN and
    the infinities."""
    wanted = describe_range(integer, low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        ok = False  # True is an int to Python, never a count or a rate to a user
    elif integer:
        ok = isinstance(value, numbers.Integral)
    else:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    return None if ok else f"must be {wanted}"


def check_number(
    name: str,
    value: Any,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """Raise ConfigError unless `value` is such a number (or None, when `optional`)."""
    if optional and value is None:
        return
    problem = number_problem(value, integer, low, high, low_open, high_open)
    if problem is not None:
        raise ConfigError(f"{name} {problem}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ConfigError unless `value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{name} must be one of {listed}, got {value!r}")


def parse_number(
    text: str,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> int | float:
    """A flag's text as such a number; ValueError("must be ..., got ...") otherwise."""
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        wanted = describe_range(integer, low, high, low_open, high_open)
        raise ValueError(f"must be {wanted}, got {text!r}") from None
    problem = number_problem(value, integer, low, high, low_open, high_open)
    if problem is not None:
        raise ValueError(f"{problem}, got {text!r}")
    return value
