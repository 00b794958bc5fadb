"""The loss curve of a run: training loss per step and validation loss per evaluation."""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tformer.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_FILE = "loss.png"


def new_figure(**kwargs: Any) -> "Figure":
    """A matplotlib figure that draws into files only (no screen needed; Figure(**kwargs)).

    matplotlib is imported on first use, and not through pyplot, which would add its screen
    machinery's imports to every training run (docs/LOG.md).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {run_dir} a training run directory?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def plot_losses(run_dir: str | Path) -> Path:
    """Write run_dir/loss.png from run_dir/metrics.jsonl; return its path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r["type"] == "train"]
    evals = [(r["step"], r["val_loss"]) for r in records if r["type"] == "eval"]
    fig = new_figure(figsize=(8, 4.5), dpi=120)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.8, label="train (per step)")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", lw=1.5, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.set_title(f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / PLOT_FILE
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
