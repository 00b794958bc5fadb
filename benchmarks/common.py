"""What every benchmark prints first: the machine it ran on."""

import platform

import torch


def cpu_model() -> str:
    """The CPU's name, with family and model numbers (some hypervisors hide the full name)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    name = fields.get("model name", "unknown CPU")
    return f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def machine_line() -> str:
    return f"CPU: {cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads" + (
        f" | GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    )
