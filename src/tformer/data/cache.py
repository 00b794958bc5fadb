"""Reading back what tformer built once and cached (a built-in corpus or question set).

A cache file is tformer's own, so one that cannot be read was damaged (cut short by a full
disk, edited by hand): the error says so and that deleting it makes the next run build it
again, instead of a traceback from deep inside the reader.
"""

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tformer.errors import DataError

T = TypeVar("T")


def read_cache(path: Path, name: str, read: Callable[[Path], T]) -> T:
    """read(path), or a DataError naming the damaged cache of `name` and the way out."""
    try:
        return read(path)
    except (ValueError, KeyError, TypeError, IndexError) as e:  # UnicodeDecodeError too
        raise DataError(
            str(path),
            f"a damaged cache of {name} ({type(e).__name__}: {e}); delete it and the next "
            "run builds it again",
        ) from None
