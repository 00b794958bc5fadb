"""Where generation meets its limits: why a continuation ended, and the warning given when
the context window cuts something.

finish_reason, one per output (the names OpenAI's API uses, plus one):
    "stop"      the end-of-text token or a stop string ended it
    "length"    max_new_tokens were generated
    "context"   the context window is full: no room for another token

A prompt or a source sentence longer than the window is cut to fit, and a batch stops when
its window is full; each is reported with a TruncationWarning (one line, from our code, so
the command line can print it as `tformer CMD: warning: ...`) and in the results.
"""

import warnings

from tformer.errors import TformerWarning

STOP, LENGTH, CONTEXT = "stop", "length", "context"


class TruncationWarning(TformerWarning):
    """The context window cut a prompt or a source, or ended continuations early."""


def warn_truncated(message: str) -> None:
    # stacklevel 2: the line of ours that cut (the caller's frame may be a torch wrapper,
    # such as inference_mode's, which would blame torch).
    warnings.warn(message, TruncationWarning, stacklevel=2)
