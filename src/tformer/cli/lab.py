"""`tformer lab`: the residual / LayerNorm experiment, with a report and plots."""

import sys
from dataclasses import asdict, replace

from tqdm import tqdm

from tformer.cli.common import DefaultsFormatter, number, print_json, seed
from tformer.data.parallel import BUILTIN_PARALLEL
from tformer.devices import bf16_supported, machine_line, pick_device
from tformer.errors import RunDirectoryError
from tformer.files import lock_directory
from tformer.lab.experiment import VARIANTS, LabConfig, run_lab
from tformer.lab.report import (
    LAB_FILE,
    PLOTS,
    is_report,
    json_safe,
    mark_report,
    summary_rows,
    write_report,
)
from tformer.lab.warmup import LABELS as WARMUP_LABELS
from tformer.lab.warmup import VARIANTS as WARMUP_VARIANTS
from tformer.lab.warmup import WarmupConfig, finding, run_warmup
from tformer.lab.warmup_report import write_warmup_report
from tformer.lab.xiong import PLACEMENTS, XiongConfig, run_xiong
from tformer.lab.xiong_report import write_xiong_report
from tformer.models.gpt2_config import INITS
from tformer.recipes.output_dir import existing_names
from tformer.recipes.run_dir import listing, output_directory

COUNT = number(integer=True, low=1)


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub) -> None:
    defaults = LabConfig()
    p = sub.add_parser(
        "lab",
        help="why residual connections and LayerNorm make deep Transformers trainable",
        formatter_class=DefaultsFormatter,
        description="Train a grid of character-level GPTs on the built-in Shakespeare, over "
        "depth and variant (pre-LN and post-LN, each with and without learning-rate warm-up; "
        "no LayerNorm; no residual connection), all with the same seed, data and step budget. "
        "Measure each at initialisation (gradient norm by layer, residual-stream norm by "
        "layer) and after training, and write OUT/report.md with a table and plots "
        f"({', '.join(PLOTS)}) and OUT/results.json. Finished runs are kept in OUT/runs: "
        "run the same command again to resume an interrupted lab. The default grid takes "
        "about 20 minutes on two CPU cores; --quick about 20 seconds.",
    )
    p.add_argument("--out", default="lab-report", help="report directory")
    p.add_argument("--quick", action="store_true", help="a small grid for a first look or a test")
    p.add_argument(
        "--reproduce",
        choices=["xiong", "warmup"],
        help="instead of the grid, a paper's own measurement. xiong: Xiong et al. (2020)'s "
        "||dL/dW2|| of every block at initialisation (nothing is trained), over --depths, "
        "post-LN, pre-LN and no LayerNorm, the original Transformer's and GPT-2's "
        "initialisations, --seeds seeds, at d_model 256, 4 heads, context 128, batch 16, "
        "with each of the paper's predictions checked; writes OUT/xiong.md, xiong.png, "
        "xiong.json (about 2 minutes on two CPU cores). warmup: Xiong et al.'s finding "
        "that post-LN needs warm-up and pre-LN does not, where they found it: four "
        "encoder-decoders (post-LN and pre-LN, each with and without warm-up) trained on "
        "--data with the same budget, scored by BLEU and chrF on its test pairs; writes "
        "OUT/warmup.md, warmup.png, warmup.json (number-words about 10 minutes, "
        "bible-en-es about 35, on two CPU cores with bfloat16)",
    )
    p.add_argument(
        "--data",
        choices=list(BUILTIN_PARALLEL),
        help=f"with --reproduce warmup: the corpus (default: {WarmupConfig().data}; "
        f"--quick: {WarmupConfig.quick().data})",
    )
    p.add_argument(
        "--seeds",
        type=COUNT,
        help=f"with --reproduce xiong: model seeds 0..N-1 (default: {XiongConfig().seeds})",
    )
    p.add_argument(
        "--depths",
        type=int_list,
        help=f"comma-separated numbers of layers (default: {','.join(map(str, defaults.depths))})",
    )
    p.add_argument(
        "--variants",
        help=f"comma-separated, from: {', '.join(f'{k} ({v.label})' for k, v in VARIANTS.items())}"
        " (default: all)",
    )
    p.add_argument(
        "--steps", type=COUNT, help=f"training steps per run (default: {defaults.steps})"
    )
    p.add_argument("--d-model", type=COUNT, help=f"model width (default: {defaults.d_model})")
    p.add_argument("--n-heads", type=COUNT, help=f"(default: {defaults.n_heads})")
    p.add_argument("--context", type=COUNT, help=f"(default: {defaults.context})")
    p.add_argument("--batch-size", type=COUNT, help=f"(default: {defaults.batch_size})")
    p.add_argument(
        "--lr",
        type=number(low=0.0, low_open=True),
        help=f"peak learning rate (default: {defaults.lr:g})",
    )
    p.add_argument(
        "--warmup-steps",
        type=number(integer=True, low=0),
        help=f"(default: {defaults.warmup_steps})",
    )
    p.add_argument(
        "--seed",
        type=seed,
        help=f"(default: {defaults.seed})",
    )
    p.add_argument(
        "--init",
        choices=list(INITS),
        help="; ".join(f"{name}: {words}" for name, words in INITS.items())
        + f" (default: {defaults.init})",
    )
    p.add_argument("--fresh", action="store_true", help="rerun runs already saved in OUT/runs")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true", help="print the summary table as one JSON line")
    p.set_defaults(run=run)


# The options each mode takes: the trained grid (no --reproduce) and each reproduction.
OPTIONS = {
    None: ("depths", "variants", "steps", "d_model", "n_heads", "context", "batch_size", "lr",
           "warmup_steps", "seed", "init"),
    "xiong": ("depths", "d_model", "n_heads", "context", "batch_size", "seeds"),
    "warmup": ("data", "steps", "d_model", "n_heads", "batch_size", "lr", "warmup_steps",
               "seed"),
}  # fmt: skip


def check_options(args) -> None:
    """Refuse, in one line, an option the chosen mode does not take."""
    takes = OPTIONS[args.reproduce]
    every = {name for names in OPTIONS.values() for name in names}
    for name in sorted(every - set(takes)):
        if getattr(args, name) is not None:
            mode = f"--reproduce {args.reproduce}" if args.reproduce else "the trained grid"
            flags = ", ".join("--" + n.replace("_", "-") for n in takes)
            raise ValueError(f"--{name.replace('_', '-')} does not apply to {mode} (it takes "
                             f"{flags})")  # fmt: skip


def given(args, config_type):
    """The base config (or --quick's) with the options given on the command line."""
    base = config_type.quick() if args.quick else config_type()
    overrides = {n: getattr(args, n) for n in OPTIONS[args.reproduce]}
    if overrides.get("variants") is not None:
        overrides["variants"] = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def progress(total: int, unit: str, args):
    """A progress bar (none with --json) and the on_run callback that moves it."""
    bar = tqdm(total=total, unit=unit, dynamic_ncols=True, disable=args.json)

    def on_run(index: int, total: int, name: str) -> None:
        bar.n = index
        bar.set_description(name)
        bar.refresh()

    return bar, on_run


def run(args) -> None:
    check_options(args)
    config_type = {None: LabConfig, "xiong": XiongConfig, "warmup": WarmupConfig}
    config = given(args, config_type[args.reproduce])
    # A new or empty directory, or an earlier report of the lab's own (whose runs resume).
    out = output_directory(args.out)
    names = existing_names(out, "--out")
    if names and not is_report(out, names):
        raise RunDirectoryError(
            f"{out} is not empty ({listing(names)}) and is not a lab report (no {LAB_FILE}): "
            "pick an empty or new --out, or the directory of an earlier report of this command"
        )
    mark_report(out)  # before run_lab writes runs/: whatever stops it, a report resumes
    lock = lock_directory(out)  # one lab writes a report at a time
    try:
        lock.announce()
        device = pick_device(args.device)
        machine = machine_line()
        print(machine, file=sys.stderr)
        if isinstance(config, XiongConfig):
            reproduce_xiong(config, out, device, machine, args)
            return
        if isinstance(config, WarmupConfig):
            reproduce_warmup(config, out, device, machine, args)
            return
        bar, on_run = progress(len(config.depths) * len(config.variants), "run", args)
        with bar:
            results, data = run_lab(config, out, device, args.fresh, on_run)
            bar.n = bar.total
        report = write_report(out, config, data, results, machine)
    finally:
        lock.release()
    if args.json:
        print_json(
            json_safe({"machine": machine, "report": str(report), "runs": summary_rows(results)})
        )
        return
    for row in summary_rows(results):
        loss = "—" if row["final_val_loss"] is None else f"{row['final_val_loss']:.3f}"
        ratio = "—" if row["grad_ratio"] is None else f"{row['grad_ratio']:.2f}"
        print(
            f"{row['depth']:>3} layers  {row['label']:<20} val loss {loss:>6}  "
            f"{row['status']:<8}  gradient ratio last/first {ratio}"
        )
    print(f"report: {report}")


def reproduce_xiong(config: XiongConfig, out, device, machine: str, args) -> None:
    total = len(config.placements) * len(config.inits) * len(config.depths) * config.seeds
    bar, on_run = progress(total, "model", args)
    with bar:
        results = run_xiong(config, out, device, args.fresh, on_run)
        bar.n = bar.total
    report, rows = write_xiong_report(out, config, results, machine)
    if args.json:
        print_json(json_safe({"machine": machine, "report": str(report), "summary": rows}))
        return
    for row in rows:
        slope = "—" if row["depth_slope"] is None else f"{row['depth_slope']:+.2f}"
        across, within = row["verdict"]
        print(
            f"{PLACEMENTS[row['placement']]:<13} {row['init']:<8} last layer ~ L^{slope:<6}"
            f"{'(' + across + ')' if across else '':<17} growth within {row['deepest']} layers "
            f"{row['growth']:.2f} {'(' + within + ')' if within else ''}"
        )
    print(f"report: {report}")


def reproduce_warmup(config: WarmupConfig, out, device, machine: str, args) -> None:
    if config.dtype == "bfloat16" and not bf16_supported(device):
        print("this device computes no bfloat16 natively: training in float32", file=sys.stderr)
        config = replace(config, dtype="float32")
    bar, on_run = progress(len(WARMUP_VARIANTS), "run", args)
    with bar:
        results, data = run_warmup(config, out, device, args.fresh, on_run, not args.json)
        bar.n = bar.total
    report = write_warmup_report(out, config, data, results, machine)
    if args.json:
        runs = [{k: v for k, v in asdict(r).items() if k not in ("train_loss", "val_loss")}
                for r in results]  # fmt: skip
        print_json(json_safe({"machine": machine, "report": str(report),
                              "finding": finding(results), "runs": runs}))  # fmt: skip
        return
    for r in results:
        loss = "—" if r.final_val_loss is None else f"{r.final_val_loss:.3f}"
        bleu = "—" if r.bleu is None else f"{r.bleu:.2f}"
        print(f"{WARMUP_LABELS[r.variant]:<22} val loss {loss:>6}  test BLEU {bleu:>6}  {r.status}")
    print(f"Xiong et al.'s warm-up finding {finding(results)}")
    print(f"report: {report}")
