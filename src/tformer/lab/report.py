"""The lab's report: a Markdown table and three plots, written into one directory.

report.md            the settings, the table, the plots
results.json         every number (one object per run)
loss_curves.png      training loss per step, one panel per depth, one line per variant
grad_norms.png       at initialisation, by layer: the parameters' gradient norm (top)
                     and the gradient arriving at the residual stream (bottom)
residual_norms.png   the residual stream's norm by layer, at initialisation (top) and
                     after training (bottom)
runs/                each finished run (tformer.lab.experiment), so a lab resumes
lab.json             {"format": "tformer-lab/1"}: marks the directory as a lab report,
                     written when the lab starts (mark_report)

`tformer lab` writes only into a new or empty directory, or one of its own reports
(is_report): one marked by lab.json, or one a lab wrote before the mark existed (its
report.md or results.json, and only OUTPUT_NAMES). A directory is never taken for a report
by a name alone that a user may have too (a `runs/`). A failed write says which file and why.
"""

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from tformer.files import (
    WRITE_ERRORS,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    is_write_error,
    read_json,
    write_failure,
)
from tformer.lab.experiment import POSITIONS_OF, VARIANTS, LabConfig, LabData, RunResult
from tformer.models.gpt2_config import INITS
from tformer.train.plots import new_figure

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"
PLOTS = ("loss_curves.png", "grad_norms.png", "residual_norms.png")
LAB_FILE = "lab.json"
LAB_FORMAT = "tformer-lab/1"  # lab.json's "format": this directory is a lab report
OUTPUT_NAMES = (LAB_FILE, REPORT_FILE, RESULTS_FILE, *PLOTS, "runs")  # runs/: run_lab's


def is_report(out_dir: Path, names: list[str]) -> bool:
    """Whether `out_dir`, holding `names`, is a report of the lab's own (see above)."""
    if LAB_FILE in names:
        try:
            mark = read_json(out_dir / LAB_FILE, "the mark of a lab report")
        except (OSError, ValueError):
            return False
        return str(mark.get("format", "")).startswith("tformer-lab/")
    earlier = REPORT_FILE in names or RESULTS_FILE in names
    return earlier and all(name in OUTPUT_NAMES for name in names)


def mark_report(out_dir: Path) -> None:
    """Mark `out_dir` as a lab report (lab.json), before anything else is written there."""
    path = out_dir / LAB_FILE
    try:
        atomic_write_json(path, {"format": LAB_FORMAT})
    except OSError as e:
        raise write_failure(path, e, "nothing was written") from None


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN or infinity: such a number is written as null."""
    return x if x is not None and math.isfinite(x) else None


def json_safe(obj):
    if isinstance(obj, float):
        return finite_or_none(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def summary_rows(results: list[RunResult]) -> list[dict]:
    """One row per run, the table's columns."""
    return [
        {
            "depth": r.depth,
            "variant": r.variant,
            "label": VARIANTS[r.variant].label,
            "final_val_loss": finite_or_none(r.final_val_loss),
            "status": r.status,
            "grad_ratio": finite_or_none(r.grad_ratio),
            "residual_growth_init": finite_or_none(
                r.init_residual_norms[-1] / r.init_residual_norms[0]
                if r.init_residual_norms[0] > 0
                else math.inf
            ),
            "steps_done": r.steps_done,
            "seconds": r.seconds,
        }
        for r in results
    ]


def status_words(row: dict, steps: int) -> str:
    """A row's status, with the step whose loss was not finite where training stopped there
    (the steps before it are recorded, that one is not)."""
    if row["status"] == "diverged" and row["steps_done"] < steps:
        return f"diverged at step {row['steps_done'] + 1}"
    if row["status"] == "diverged":
        return "diverged (the final evaluation's loss)"
    return row["status"]


def _number(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown_report(
    config: LabConfig, data: LabData, results: list[RunResult], machine: str
) -> str:
    lines = [
        "# The residual / LayerNorm lab",
        "",
        "Character-level GPTs on the built-in Shakespeare (vocabulary "
        f"{data.tokenizer.vocab_size}), d_model {config.d_model}, {config.n_heads} heads, "
        f"context {config.context}, batch "
        f"{config.batch_size}, {config.steps} steps of AdamW (lr {config.lr:g}, cosine decay to "
        f"{config.min_lr:g}; warm-up {config.warmup_steps} steps where the variant has it), "
        f"gradient clipping 1.0, {config.dtype}, seed {config.seed}; exact GELU, d_ff "
        f"{4 * config.d_model}, dropout 0, {POSITIONS_OF[config.init]} positions; "
        f"initialisation `{config.init}`: {INITS[config.init]}. The instruments measure "
        f"one batch of {config.probe_batch_size} training windows (seed {config.seed}) at "
        "initialisation. The loss is the mean over "
        f"{config.eval_batches} validation batches at the last step. Predicting each character "
        f"from its frequency alone gives {data.unigram_loss:.3f} (the unigram loss), and a "
        f"uniform guess {math.log(data.tokenizer.vocab_size):.3f}.",
        "",
        f"Machine: {machine}",
        "",
        "Status: *diverged* = the loss became NaN or infinite; *failed* = it ended no better "
        "than the unigram loss; *trained* otherwise. Gradient ratio = ||dL/dθ|| of the last "
        "layer's parameters over the first layer's, at initialisation, on one probe batch. "
        "Stream growth = the residual stream's mean norm leaving the last layer over its norm "
        "entering the first, at initialisation.",
        "",
        "| depth | variant | final val loss | status | gradient ratio (last/first) "
        "| stream growth | seconds |",
        "|---:|---|---:|---|---:|---:|---:|",
    ]
    for row in summary_rows(results):
        lines.append(
            f"| {row['depth']} | {row['label']} | {_number(row['final_val_loss'], 3)} | "
            f"{status_words(row, config.steps)} | {_number(row['grad_ratio'], 2)} | "
            f"{_number(row['residual_growth_init'], 2)} | {row['seconds']:.0f} |"
        )
    lines += ["", "## Plots", ""]
    for name in PLOTS:
        lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def _by_depth(results: list[RunResult]) -> dict[int, list[RunResult]]:
    grouped: dict[int, list[RunResult]] = {}
    for r in results:
        grouped.setdefault(r.depth, []).append(r)
    return grouped


def panels(rows: int, columns: int):
    fig = new_figure(figsize=(4.2 * columns, 3.4 * rows), dpi=110)
    return fig, fig.subplots(rows, columns, squeeze=False)


def save_png(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(results: list[RunResult], data: LabData, path: Path) -> None:
    grouped = _by_depth(results)
    fig, axes = panels(1, len(grouped))
    ceiling = math.log(data.tokenizer.vocab_size) + 0.5
    for ax, (depth, runs) in zip(axes[0], grouped.items(), strict=True):
        for r in runs:
            losses = [min(x, ceiling) if math.isfinite(x) else ceiling for x in r.train_loss]
            window = max(1, len(losses) // 50)
            ax.plot(
                range(1, len(losses) + 1),
                smooth(losses, window),
                lw=1.1,
                color=color_of(r.variant),
                label=VARIANTS[r.variant].label,
            )
        ax.axhline(data.unigram_loss, color="grey", ls=":", lw=1, label="unigram loss")
        ax.set_title(f"{depth} layers")
        ax.set_xlabel("step")
        ax.set_ylim(top=ceiling)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (nats, smoothed)")
    axes[0][-1].legend(fontsize=7)
    save_png(fig, path)


def color_of(variant: str) -> str:
    """One colour per variant in every plot, whichever runs a plot leaves out."""
    return f"C{list(VARIANTS).index(variant)}"


def at_initialisation(runs: list[RunResult]) -> list[tuple[RunResult, str]]:
    """The runs to draw at initialisation, with their labels: a variant and its no-warm-up
    twin start from the same weights, so they are one line."""
    present = {r.variant for r in runs}
    drawn = []
    for r in runs:
        twin = r.variant + "-nowarmup"
        if r.variant.endswith("-nowarmup") and r.variant.removesuffix("-nowarmup") in present:
            continue
        label = VARIANTS[r.variant].label
        drawn.append((r, f"{label} (± warm-up)" if twin in present else label))
    return drawn


def _by_layer(ax, runs: list[tuple[RunResult, str]], values, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for r, label in runs:
        ys = values(r)
        if ys is None:  # a diverged run has no state after training
            continue
        ax.plot(range(len(ys)), ys, "o-", ms=2.5, lw=1.1, color=color_of(r.variant), label=label)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)


def plot_grad_norms(results: list[RunResult], path: Path) -> None:
    grouped = _by_depth(results)
    fig, axes = panels(2, len(grouped))
    for column, (depth, runs) in enumerate(grouped.items()):
        top, bottom = axes[0][column], axes[1][column]
        first = at_initialisation(runs)
        _by_layer(top, first, lambda r: r.init_param_grads, "||dL/dθ|| of the layer")
        _by_layer(bottom, first, lambda r: r.init_residual_grads, "||dL/dx|| entering the layer")
        top.set_title(f"{depth} layers, at initialisation")
        bottom.set_xlabel("layer (0 = first)")
    axes[0][-1].legend(fontsize=7)
    save_png(fig, path)


def plot_residual_norms(results: list[RunResult], path: Path) -> None:
    grouped = _by_depth(results)
    fig, axes = panels(2, len(grouped))
    for column, (depth, runs) in enumerate(grouped.items()):
        top, bottom = axes[0][column], axes[1][column]
        after = [(r, VARIANTS[r.variant].label) for r in runs]
        norm = "mean ||x|| per position"
        _by_layer(top, at_initialisation(runs), lambda r: r.init_residual_norms, norm)
        _by_layer(bottom, after, lambda r: r.final_residual_norms, norm)
        top.set_title(f"{depth} layers, at initialisation")
        bottom.set_title(f"{depth} layers, after training")
        bottom.set_xlabel("residual stream after layer (0 = embeddings)")
    axes[0][-1].legend(fontsize=7)
    axes[1][-1].legend(fontsize=7)
    save_png(fig, path)


def write_report(
    out_dir: str | Path,
    config: LabConfig,
    data: LabData,
    results: list[RunResult],
    machine: str,
) -> Path:
    """Write report.md, results.json and the plots into out_dir; return report.md's path. A
    failed write is a WriteError naming the file (each is written whole or not at all)."""
    numbers = {
        "machine": machine,
        "config": asdict(config),
        "unigram_loss": data.unigram_loss,
        "summary": summary_rows(results),
        "runs": [asdict(r) for r in results],
    }
    plots = {
        PLOTS[0]: lambda path: plot_loss_curves(results, data, path),
        PLOTS[1]: lambda path: plot_grad_norms(results, path),
        PLOTS[2]: lambda path: plot_residual_norms(results, path),
    }
    text = markdown_report(config, data, results, machine)
    return write_files(Path(out_dir), (RESULTS_FILE, numbers), plots, (REPORT_FILE, text))


def write_files(
    out_dir: Path,
    numbers: tuple[str, dict],
    plots: dict[str, Callable[[Path], None]],
    report: tuple[str, str],
) -> Path:
    """A report's files, each written whole or not at all: the numbers as JSON (NaN and
    infinity as null), each plot by its function, then the Markdown; -> the Markdown's path.
    A failed write is a WriteError that names the file and says that the finished runs in
    out_dir/runs are kept."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / numbers[0], json_safe(numbers[1]))
        for name, draw in plots.items():
            draw(out_dir / name)
        path = out_dir / report[0]
        atomic_write_text(path, report[1] + "\n")
        return path
    except WRITE_ERRORS as e:
        if not is_write_error(e):
            raise
        where = e.filename if isinstance(e, OSError) and e.filename else out_dir
        raise write_failure(where, e, f"the finished runs in {out_dir / 'runs'} are kept") from None
