"""What every benchmark prints first: the machine it ran on (tformer.devices)."""

from tformer.devices import cpu_model, machine_line

__all__ = ["cpu_model", "machine_line"]
