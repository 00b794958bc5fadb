"""`tformer plot`: the loss curve of a training run."""

from tformer.recipes.run_dir import output_directory
from tformer.train.plots import plot_losses


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="draw a run's loss curve (loss.png)",
        description="Draw training and validation loss from RUN_DIR/metrics.jsonl into "
        "RUN_DIR/loss.png. Works on a run that is still going or was interrupted.",
    )
    p.add_argument("run_dir", help="a directory written by 'tformer train'")
    p.set_defaults(run=run)


def run(args) -> None:
    print(plot_losses(output_directory(args.run_dir, "RUN_DIR")))
