"""The one error a checkpoint raises when it cannot be loaded as asked."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked, with the reason and what to do."""
