"""What every benchmark prints first: the machine it ran on."""

import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    return f"CPU: {cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads" + (
        f" | GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    )
