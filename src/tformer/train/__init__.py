"""Training: the loop, optimiser and schedule, checkpoints, data parallelism, plots."""

from tformer.train.trainer import TrainConfig, evaluate, fit

__all__ = ["TrainConfig", "evaluate", "fit"]
