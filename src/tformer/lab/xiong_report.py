"""The report of `tformer lab --reproduce xiong`: tables, a plot and every number.

xiong.md     the settings, the last layer's ||dL/dW2|| over depth (mean ± sample standard
             deviation over seeds), the slope over depth and the deepest model's growth,
             each beside the paper's prediction and whether it holds here
xiong.json   every measurement and the summary
xiong.png    left: the last layer's ||dL/dW2|| over depth (log-log, ± one standard
             deviation), with 1/sqrt(L) for comparison; right: the deepest models' profile
             over their layers
runs/        each measurement (tformer.lab.xiong), so a reproduction resumes
"""

import math
from dataclasses import asdict
from pathlib import Path

from tformer.lab.experiment import POSITIONS_OF
from tformer.lab.report import panels, save_png, write_files
from tformer.lab.xiong import (
    FLAT_SLOPE,
    GROWS,
    LEVEL,
    PLACEMENTS,
    PREDICTIONS,
    SLOPE_BAND,
    Measurement,
    XiongConfig,
    summary,
)

REPORT_FILE, RESULTS_FILE, PLOT_FILE = "xiong.md", "xiong.json", "xiong.png"


def markdown(config: XiongConfig, rows: list[dict], machine: str, seconds: float) -> str:
    """seconds: the measurements' own time, summed (a resumed reproduction's too)."""
    depths = list(config.depths)
    lines = [
        "# Xiong et al. (2020), reproduced: ||dL/dW2|| at initialisation",
        "",
        f"Character-level GPTs on the built-in Shakespeare, d_model {config.d_model}, "
        f"{config.n_heads} heads, d_ff {4 * config.d_model}, exact GELU, no dropout; one "
        f"batch of {config.batch_size} windows of {config.context} characters from the "
        f"training text (batch seed {config.batch_seed}), the same for every model; "
        f"{config.seeds} model seeds (0..{config.seeds - 1}). L is the mean cross-entropy; "
        "W2 is each block's second feed-forward matrix; ||.|| the Frobenius norm. "
        "Initialisations (tformer.models.gpt2): "
        + "; ".join(f"`{init}` with {POSITIONS_OF[init]} positions" for init in config.inits)
        + ".",
        "",
        f"Machine: {machine}. Measured in {seconds:.0f} s.",
        "",
        "## The last layer's ||dL/dW2_L|| over depth L",
        "",
        "Mean ± standard deviation over the seeds. Slope e: mean ~ L^e by least squares on "
        "the logarithms (1/sqrt(L) is e = -0.5). Prediction (Theorem 1): post-LN does not "
        f"shrink with L (taken to hold if e >= {FLAT_SLOPE}); pre-LN falls like 1/sqrt(L) "
        f"({SLOPE_BAND[0]} <= e <= {SLOPE_BAND[1]}).",
        "",
        "| placement | init | " + " | ".join(f"L = {d}" for d in depths) + " | slope e "
        "| predicted | here |",
        "|---|---|" + "---:|" * len(depths) + "---:|---|---|",
    ]
    for row in rows:
        cells = []
        for d in depths:
            value = row["last_w2_grad"].get(d)
            cells.append("—" if value is None else f"{value['mean']:.3g} ± {value['sd']:.2g}")
        slope = "—" if row["depth_slope"] is None else f"{row['depth_slope']:+.2f}"
        lines.append(
            f"| {PLACEMENTS[row['placement']]} | `{row['init']}` | {' | '.join(cells)} | "
            f"{slope} | {row['prediction'][0] or '—'} | {row['verdict'][0] or '—'} |"
        )
    deepest = max(depths)
    lines += [
        "",
        f"## Within the deepest model ({deepest} layers)",
        "",
        "Growth g: the mean ||dL/dW2_l|| (over seeds) of the last quarter of the layers over "
        "that of the first quarter. Prediction (Figure 3): post-LN's grows towards the output "
        f"(taken to hold if g >= {GROWS}); pre-LN's is level ({LEVEL[0]} <= g <= {LEVEL[1]}).",
        "",
        "| placement | init | first layer | middle layer | last layer | largest at layer "
        "| growth g | predicted | here |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        layers = row["profile"]
        largest = max(range(len(layers)), key=layers.__getitem__)
        lines.append(
            f"| {PLACEMENTS[row['placement']]} | `{row['init']}` | {layers[0]:.3g} | "
            f"{layers[len(layers) // 2]:.3g} | {layers[-1]:.3g} | {largest} of "
            f"0..{len(layers) - 1} | {row['growth']:.2f} | {row['prediction'][1] or '—'} | "
            f"{row['verdict'][1] or '—'} |"
        )
    lines += [
        "",
        "Initial loss (mean over seeds; a uniform guess gives ln V): "
        + "; ".join(
            f"{PLACEMENTS[r['placement']]} `{r['init']}` "
            + ", ".join(f"L={d} {loss:.2f}" for d, loss in r["initial_loss"].items())
            for r in rows
        )
        + ".",
        "",
        f"![{PLOT_FILE}]({PLOT_FILE})",
        "",
        "The plot shows post-LN and pre-LN; no LayerNorm's gradients are in the tables only.",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """post-LN and pre-LN (the placements the paper predicts for), every init."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    fig, axes = panels(1, 2)
    left, right = axes[0]
    styles = {"vaswani": "-", "gpt2": "--", "xavier": ":"}
    colors = {"post": "C2", "pre": "C0", "none": "C4"}
    for row in rows:
        if row["placement"] not in PREDICTIONS:  # no LayerNorm: its scale would hide the rest
            continue
        label = f"{PLACEMENTS[row['placement']]}, {row['init']}"
        style = dict(color=colors[row["placement"]], ls=styles[row["init"]], lw=1.2)
        depths = sorted(row["last_w2_grad"])
        means = [row["last_w2_grad"][d]["mean"] for d in depths]
        sds = [row["last_w2_grad"][d]["sd"] for d in depths]
        left.errorbar(depths, means, yerr=sds, marker="o", ms=3, capsize=2, label=label, **style)
        right.plot(range(len(row["profile"])), row["profile"], marker="o", ms=2, **style)
        if row["placement"] == "pre" and row["init"] == "vaswani" and means:
            scale = means[0] * math.sqrt(depths[0])
            left.plot(depths, [scale / math.sqrt(d) for d in depths], color="grey", ls=":",
                      lw=1, label="1/sqrt(L) from pre-LN's first")  # fmt: skip
    left.set_xscale("log")
    left.xaxis.set_major_locator(FixedLocator(sorted({d for r in rows for d in r["last_w2_grad"]})))
    left.xaxis.set_major_formatter(ScalarFormatter())
    left.xaxis.set_minor_locator(NullLocator())
    left.set_yscale("log")
    left.set_xlabel("layers L")
    left.set_ylabel("last layer's ||dL/dW2||")
    left.set_title("across depth (± 1 sd over seeds)")
    right.set_yscale("log")
    right.set_xlabel("layer (0 = first)")
    right.set_ylabel("||dL/dW2|| (mean over seeds)")
    right.set_title(f"within the {max(max(r['last_w2_grad']) for r in rows)}-layer models")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=6)
    save_png(fig, path)


def write_xiong_report(
    out_dir: str | Path,
    config: XiongConfig,
    results: list[Measurement],
    machine: str,
) -> tuple[Path, list[dict]]:
    """Write xiong.md, xiong.json and xiong.png; -> the report's path and the summary. A
    failed write is a WriteError naming the file (each is written whole or not at all)."""
    out_dir = Path(out_dir)
    rows = summary(results, config)
    seconds = sum(m.seconds for m in results)
    numbers = {
        "machine": machine,
        "seconds": seconds,
        "config": asdict(config),
        "summary": rows,
        "measurements": [asdict(m) for m in results],
    }
    text = markdown(config, rows, machine, seconds)
    path = write_files(
        out_dir, (RESULTS_FILE, numbers), {PLOT_FILE: lambda p: plot(rows, p)}, (REPORT_FILE, text)
    )
    return path, rows
