"""The loss curve of a run: training loss per step and validation loss per evaluation."""

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tformer.errors import DataError
from tformer.files import atomic_write, write_failure
from tformer.train.metrics import METRICS_FILE, read_metrics

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


def points(run_dir: Path, records: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
    """(step, value of `key`) of each record of type `kind`; a record without a number
    there is an error naming the file."""
    found = []
    for record in records:
        if record["type"] != kind:
            continue
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            where = f"{run_dir / METRICS_FILE}, step {record['step']}"
            raise DataError(where, f"a {kind} record without a number '{key}'")
        found.append((record["step"], value))
    return found


def plot_losses(run_dir: str | Path, intact: str = "") -> Path:
    """Write run_dir/loss.png from run_dir/metrics.jsonl; return its path. A write that
    fails is a WriteError that ends with `intact` (what the caller knows is safe)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such directory (a training run's, expected)")
    records = read_metrics(run_dir)
    train = points(run_dir, records, "train", "loss")
    evals = points(run_dir, records, "eval", "val_loss")
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
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    except OSError as e:
        raise write_failure(path, e, intact or f"{path.name} is as it was") from None
    return path
