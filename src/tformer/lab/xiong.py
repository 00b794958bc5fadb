"""Xiong et al. (2020)'s measurement: the gradient of every block's W2 at initialisation.

"On Layer Normalization in the Transformer Architecture" (Xiong et al., 2020) measures, at
initialisation and on real data, ||dL/dW2_l||_F: the gradient of the mean cross-entropy
with respect to the second feed-forward matrix W2 of layer l. Its Theorem 1 bounds the last
layer's, in a model of L layers of width d,

    post-LN   ||dL/dW2_L||_F <= O(d sqrt(ln d))            the same at every depth L
    pre-LN    ||dL/dW2_L||_F <= O(d sqrt(ln d / L))        falling like 1/sqrt(L)

and its Figure 3 shows the profile within one model: post-LN's gradients grow towards the
output layer, pre-LN's stay level. (Large gradients near the output are why post-LN needs a
learning-rate warm-up.)

`run_xiong` measures exactly that on a character-level GPT (tformer.models.gpt2) over
depths, norm placements, initialisations and seeds, one fixed batch of the built-in
Shakespeare, and checks each prediction against what it measured:

    across depth   e, the slope of ln(mean ||dL/dW2_L||) over ln L (least squares):
                   post-LN holds if e >= -0.25 (flat); pre-LN if -0.75 <= e <= -0.25
                   (1/sqrt(L) is e = -0.5)
    within a model g, the mean ||dL/dW2_l|| of the last quarter of the deepest model's
                   layers over that of its first quarter: post-LN holds if g >= 1.25
                   (grows towards the output); pre-LN if 0.8 <= g <= 1.25 (level)

The thresholds are this module's, not the paper's: the paper states orders of growth.
Each measurement is saved in OUT/runs as it finishes, so a killed reproduction resumes.
"""

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tformer.data.tokens import Batch
from tformer.lab.experiment import char_gpt, load_lab_data, save_run, saved_run
from tformer.lab.instruments import norm_of
from tformer.models.gpt2 import GPT2, GPT2Config
from tformer.models.gpt2_config import INITS
from tformer.nn.sublayer import NORM_POSITIONS

PLACEMENTS = {"post": "post-LN", "pre": "pre-LN", "none": "no LayerNorm"}
PREDICTIONS = {  # placement -> (across depth, within a model), in the paper's words
    "post": ("does not shrink with L", "grows towards the output"),
    "pre": ("falls like 1/sqrt(L)", "level across layers"),
}
FLAT_SLOPE, SLOPE_BAND = -0.25, (-0.75, -0.25)
GROWS, LEVEL = 1.25, (0.8, 1.25)


@dataclass
class XiongConfig:
    depths: tuple[int, ...] = (2, 6, 12, 24)
    placements: tuple[str, ...] = ("post", "pre", "none")
    inits: tuple[str, ...] = ("vaswani", "gpt2")
    seeds: int = 5  # the models' seeds 0..seeds-1; the batch is the same for all
    d_model: int = 256
    n_heads: int = 4
    context: int = 128
    batch_size: int = 16
    batch_seed: int = 0  # which windows of the training text make the batch

    def __post_init__(self) -> None:
        # each once, in the order given
        self.depths = tuple(dict.fromkeys(self.depths))
        self.placements = tuple(dict.fromkeys(self.placements))
        self.inits = tuple(dict.fromkeys(self.inits))
        if not self.depths or any(not isinstance(d, int) or d <= 0 for d in self.depths):
            raise ValueError(f"depths must be positive integers, got {self.depths}")
        for name, given, known in (
            ("placements", self.placements, NORM_POSITIONS),
            ("inits", self.inits, tuple(INITS)),
        ):
            unknown = [x for x in given if x not in known]
            if unknown or not given:
                raise ValueError(
                    f"{name}: unknown {', '.join(unknown) or '(none given)'}; choose from "
                    f"{', '.join(known)}"
                )
        for name in ("seeds", "d_model", "n_heads", "context", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self.model_config(self.depths[0], self.placements[0], self.inits[0], 2)  # its checks

    @classmethod
    def quick(cls) -> "XiongConfig":
        """Small enough for a test: seconds on two CPU cores."""
        return cls(depths=(2, 4), seeds=2, d_model=32, n_heads=2, context=16, batch_size=4)

    def model_config(self, depth: int, placement: str, init: str, vocab_size: int) -> GPT2Config:
        return char_gpt(vocab_size, self.context, self.d_model, self.n_heads, depth, placement,
                        init)  # fmt: skip

    def fingerprint(self) -> str:
        """The settings one measurement depends on (not the grid's extent, nor how many
        seeds: a measurement's own seed is in its file's name)."""
        extent = ("depths", "placements", "inits", "seeds")
        settings = {k: v for k, v in asdict(self).items() if k not in extent}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Measurement:
    placement: str
    init: str
    depth: int
    seed: int
    w2_grads: list[float]  # ||dL/dW2_l||_F, layer 0 (first) .. depth - 1 (last)
    loss: float  # the batch's mean cross-entropy at initialisation
    seconds: float  # to build the model and measure


def measure(
    config: XiongConfig,
    placement: str,
    init: str,
    depth: int,
    seed: int,
    batch: Batch,
    vocab: int,
    device: torch.device | str = "cpu",
) -> Measurement:
    """One model at initialisation (drawn on the CPU, so a seed gives the same weights on
    every device): backpropagate the batch's mean cross-entropy, read each block's W2
    gradient."""
    started = time.perf_counter()
    model = GPT2(config.model_config(depth, placement, init, vocab), seed=seed).to(device)
    model.train()  # dropout is 0: the same as evaluation mode, but gradients are wanted
    logits = model(*batch.inputs)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
    loss.backward()
    grads = [norm_of([block.mlp.w2.weight.grad]) for block in model.blocks]
    seconds = time.perf_counter() - started
    return Measurement(placement, init, depth, seed, grads, float(loss.detach()), round(seconds, 3))


def run_xiong(
    config: XiongConfig,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    fresh: bool = False,
    on_run: Callable[[int, int, str], None] | None = None,
) -> list[Measurement]:
    """Every (placement, init, depth, seed) in float32 on `device`, each saved in
    out_dir/runs as it finishes and reused by a later call with the same settings unless
    `fresh`. on_run(index, total, name) is called before each."""
    runs_dir = Path(out_dir) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    data = load_lab_data(config.context)
    vocab = data.tokenizer.vocab_size
    batch = data.train.sample(config.batch_size, torch.Generator().manual_seed(config.batch_seed))
    batch = batch.to(device)
    fingerprint = config.fingerprint()
    grid = [
        (placement, init, depth, seed)
        for placement in config.placements
        for init in config.inits
        for depth in config.depths
        for seed in range(config.seeds)
    ]
    results = []
    for index, (placement, init, depth, seed) in enumerate(grid):
        path = runs_dir / f"xiong-{placement}-{init}-{depth}-{seed}.json"
        if on_run is not None:
            on_run(index, len(grid), f"{PLACEMENTS[placement]}, {init}, {depth} layers")
        result = None if fresh else saved_run(path, fingerprint, lambda f: Measurement(**f))
        if result is None:
            result = measure(config, placement, init, depth, seed, batch, vocab, device)
            save_run(path, fingerprint, result)
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------
# What the measurements say


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def select(results: list[Measurement], placement: str, init: str) -> dict[int, list[Measurement]]:
    """One placement and init's measurements, by depth (ascending)."""
    by_depth: dict[int, list[Measurement]] = {}
    for m in sorted(results, key=lambda m: (m.depth, m.seed)):
        if m.placement == placement and m.init == init:
            by_depth.setdefault(m.depth, []).append(m)
    return by_depth


def depth_slope(by_depth: dict[int, list[Measurement]]) -> float | None:
    """e of mean ||dL/dW2_L|| ~ L^e: least squares of ln(mean) over ln L (None: one depth)."""
    if len(by_depth) < 2:
        return None
    xs = [math.log(d) for d in by_depth]
    ys = [math.log(mean_and_spread([m.w2_grads[-1] for m in ms])[0]) for ms in by_depth.values()]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True))
    return num / sum((x - x_mean) ** 2 for x in xs)


def profile(measurements: list[Measurement]) -> list[float]:
    """The mean ||dL/dW2_l|| of each layer over the seeds."""
    return [sum(v) / len(v) for v in zip(*(m.w2_grads for m in measurements), strict=True)]


def growth(layers: list[float]) -> float:
    """The mean of the last quarter of the layers over that of the first quarter."""
    quarter = max(1, len(layers) // 4)
    return (sum(layers[-quarter:]) / quarter) / (sum(layers[:quarter]) / quarter)


def verdicts(placement: str, slope: float | None, grows: float) -> tuple[str, str]:
    """Whether each prediction holds here: (across depth, within a model), "holds", "does
    not hold", or "" where the paper predicts nothing (no LayerNorm) or one depth was run."""
    if placement not in PREDICTIONS:
        return "", ""
    if placement == "post":
        across = None if slope is None else slope >= FLAT_SLOPE
        within = grows >= GROWS
    else:
        across = None if slope is None else SLOPE_BAND[0] <= slope <= SLOPE_BAND[1]
        within = LEVEL[0] <= grows <= LEVEL[1]
    words = {True: "holds", False: "does not hold", None: ""}
    return words[across], words[within]


def summary(results: list[Measurement], config: XiongConfig) -> list[dict]:
    """One row per (placement, init): the last layer's mean and spread at each depth, the
    slope over depth, the deepest model's growth, and the verdicts."""
    rows = []
    for placement in config.placements:
        for init in config.inits:
            by_depth = select(results, placement, init)
            if not by_depth:
                continue
            slope = depth_slope(by_depth)
            deepest = by_depth[max(by_depth)]
            layers = profile(deepest)
            grows = growth(layers)
            across, within = verdicts(placement, slope, grows)
            last = {d: mean_and_spread([m.w2_grads[-1] for m in ms]) for d, ms in by_depth.items()}
            loss = {d: mean_and_spread([m.loss for m in ms])[0] for d, ms in by_depth.items()}
            rows.append(
                {
                    "placement": placement,
                    "init": init,
                    "last_w2_grad": {d: {"mean": m, "sd": s} for d, (m, s) in last.items()},
                    "initial_loss": loss,
                    "depth_slope": slope,
                    "deepest": max(by_depth),
                    "profile": layers,
                    "growth": grows,
                    "prediction": PREDICTIONS.get(placement, ("", "")),
                    "verdict": (across, within),
                }
            )
    return rows
