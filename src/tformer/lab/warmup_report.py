"""The report of `tformer lab --reproduce warmup`: a table, a plot and every number.

warmup.md     the settings; per variant the final validation loss, the test BLEU and chrF,
              the time; the BLEU kept without warm-up, and whether Xiong et al.'s finding
              reproduces (tformer.lab.warmup.finding)
warmup.json   every run, with its loss per step
warmup.png    left: training loss per step; right: ||dL/dW2|| per layer at initialisation
              (encoder, then decoder)
runs/         each finished run (tformer.lab.warmup), so a track resumes
"""

from dataclasses import asdict
from pathlib import Path

from tformer.lab.report import panels, save_png, smooth, write_files
from tformer.lab.warmup import LABELS, WarmupConfig, WarmupData, WarmupRun, finding, warmup_effect

REPORT_FILE, RESULTS_FILE, PLOT_FILE = "warmup.md", "warmup.json", "warmup.png"


def _number(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(config: WarmupConfig, data: WarmupData, results: list[WarmupRun], machine: str) -> str:
    c = config
    lines = [
        "# Xiong et al. (2020)'s warm-up finding, on translation",
        "",
        f"{data.description}; a joint BPE of {data.tokenizer.vocab_size:,} tokens. "
        f"Encoder-decoders of {c.n_layers}+{c.n_layers} layers, d_model {c.d_model}, "
        f"{c.n_heads} heads, d_ff {c.d_ff}, ReLU, dropout {c.dropout:g}, shared embeddings, "
        "the paper's initialisation (`vaswani`: Xavier-uniform, W^Q/W^K/W^V with the "
        "stacked matrix's bound, embeddings N(0, 1/C) times sqrt(C), sinusoidal positions). "
        f"{c.steps} steps of {c.batch_size} pairs, AdamW (betas 0.9, 0.98, decay 0.1), peak "
        f"learning rate {c.lr:g}: reached linearly over {c.warmup_steps} steps (with "
        f"warm-up) or from the first step (without), then cosine decay to {c.min_lr:g}; label "
        f"smoothing {c.label_smoothing:g}, gradient clipping 1.0, {c.dtype}, seed {c.seed}. "
        f"Validation loss: {c.eval_batches} batches at the last step. BLEU and chrF "
        f"(sacrebleu) of greedy translations of the {len(data.test)} test pairs.",
        "",
        f"Machine: {machine}. Trained and scored in {sum(r.seconds for r in results):.0f} s.",
        "",
        "| variant | final val loss | test BLEU | test chrF | status | seconds |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in results:
        lines.append(
            f"| {LABELS[r.variant]} | {_number(r.final_val_loss, 3)} | {_number(r.bleu, 2)} | "
            f"{_number(r.chrf, 2)} | {r.status} | {r.seconds:.0f} |"
        )
    post, pre = warmup_effect(results, "post"), warmup_effect(results, "pre")
    lines += [
        "",
        "BLEU kept without warm-up (without / with): post-LN "
        f"{_number(post, 2)}, pre-LN {_number(pre, 2)}. Xiong et al. (IWSLT14 De-En): post-LN "
        "~8 / ~34, pre-LN unchanged. Here the finding "
        f"**{finding(results)}** (it reproduces if post-LN keeps at most 0.5 and pre-LN at "
        "least 0.9; between 0.5 and 0.9, weakly).",
        "",
        "||dL/dW2|| of each layer at initialisation, on one batch of "
        f"{c.probe_batch_size} training pairs (encoder layers | decoder layers; a variant "
        "and its twin without warm-up start from the same weights): "
        + "; ".join(
            f"{LABELS[r.variant]} {profile(r.init_w2_grads)}"
            for r in results
            if not r.variant.endswith("-nowarmup")
        )
        + ".",
        "",
        f"![{PLOT_FILE}]({PLOT_FILE})",
    ]
    return "\n".join(lines)


def profile(grads: list[float]) -> str:
    """'a, b | c, d': the encoder's layers, then the decoder's."""
    half = len(grads) // 2
    return " | ".join(", ".join(f"{g:.3g}" for g in part) for part in (grads[:half], grads[half:]))


def plot(results: list[WarmupRun], path: Path) -> None:
    fig, axes = panels(1, 2)
    left, right = axes[0]
    colors = {"post": "C2", "post-nowarmup": "C3", "pre": "C0", "pre-nowarmup": "C1"}
    for r in results:
        losses = r.train_loss
        window = max(1, len(losses) // 50)
        left.plot(range(1, len(losses) + 1), smooth(losses, window), lw=1.1,
                  color=colors[r.variant], label=LABELS[r.variant])  # fmt: skip
        if not r.variant.endswith("-nowarmup"):  # its twin starts from the same weights
            half = len(r.init_w2_grads) // 2
            for stack, label in ((slice(0, half), LABELS[r.variant] + " (± warm-up)"),
                                 (slice(half, None), None)):  # fmt: skip
                xs = range(len(r.init_w2_grads))[stack]
                right.plot(xs, r.init_w2_grads[stack], "o-", ms=3, lw=1.1,
                           color=colors[r.variant], label=label)  # fmt: skip
    left.set_xlabel("step")
    left.set_ylabel("training loss (smoothed)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    layers = len(results[0].init_w2_grads) // 2 if results else 0
    right.axvline(layers - 0.5, color="grey", ls=":", lw=1)
    right.set_xlabel(f"layer (0-{layers - 1} encoder, {layers}-{2 * layers - 1} decoder)")
    right.set_ylabel("||dL/dW2|| at initialisation")
    right.set_yscale("log")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    save_png(fig, path)


def write_warmup_report(
    out_dir: str | Path,
    config: WarmupConfig,
    data: WarmupData,
    results: list[WarmupRun],
    machine: str,
) -> Path:
    """Write warmup.md, warmup.json and warmup.png; -> the report's path. A failed write is
    a WriteError naming the file (each is written whole or not at all)."""
    numbers = {
        "machine": machine,
        "config": asdict(config),
        "finding": finding(results),
        "runs": [asdict(r) for r in results],
    }
    text = markdown(config, data, results, machine)
    plots = {PLOT_FILE: lambda path: plot(results, path)}
    return write_files(Path(out_dir), (RESULTS_FILE, numbers), plots, (REPORT_FILE, text))
