"""Xiong et al. (2020)'s ||dL/dW2|| at initialisation: tformer against an independent model.

The reference below is a character-level Transformer language model written straight from
the papers on torch's own modules, sharing no code with tformer's models: token embeddings
N(0, 1/C) multiplied by sqrt(C) (Vaswani et al., sec. 3.4), the paper's sinusoids (sec.
3.5), torch.nn.MultiheadAttention (whose stacked (3C, C) in-projection is drawn
Xavier-uniform as one matrix; its out-projection Xavier-uniform as fairseq draws it),
LayerNorm, a GELU feed-forward network of width 4C with Xavier-uniform matrices and zero
biases, the blocks post-LN, pre-LN (with a final LayerNorm) or without LayerNorm, and the
output tied to the (unscaled) token embedding. Its random numbers come from torch's global
generator, so its seeds and tformer's draw different weights from the same distributions.

For the same batch of the built-in Shakespeare as `tformer lab --reproduce xiong`, both
measure each block's ||dL/dW2|| over --seeds seeds at each depth; printed side by side: the
last layer's mean ± standard deviation, and whether tformer's mean lies within the
reference's mean ± 2 standard deviations. tformer's figures come from --report (a
reproduction's xiong.json, whose sizes and batch are then used) or are measured here.

    python benchmarks/xiong_reference.py [--depths 2,6,12,24] [--seeds 5] [--report DIR]
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from tformer.lab.experiment import load_lab_data  # noqa: E402
from tformer.lab.xiong import XiongConfig, mean_and_spread, run_xiong  # noqa: E402

PLACEMENTS = ("post", "pre", "none")
SIZES = ("d_model", "n_heads", "context", "batch_size", "batch_seed")


class PaperBlock(nn.Module):
    def __init__(self, width: int, heads: int, placement: str) -> None:
        super().__init__()
        self.placement = placement
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        nn.init.xavier_uniform_(self.attention.out_proj.weight)  # fairseq's; torch: Kaiming
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        for linear in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        future = torch.ones(t, t, dtype=torch.bool).triu(1)  # True: may not attend
        return self.attention(x, x, x, attn_mask=future, need_weights=False)[0]

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "post":
            x = self.norm1(x + self.attend(x))
            return self.norm2(x + self.feed_forward(x))
        if self.placement == "pre":
            x = x + self.attend(self.norm1(x))
            return x + self.feed_forward(self.norm2(x))
        x = x + self.attend(x)
        return x + self.feed_forward(x)


class PaperLM(nn.Module):
    def __init__(self, vocab: int, width: int, heads: int, depth: int, placement: str) -> None:
        super().__init__()
        self.width = width
        self.embedding = nn.Embedding(vocab, width)
        nn.init.normal_(self.embedding.weight, std=width**-0.5)
        self.blocks = nn.ModuleList(PaperBlock(width, heads, placement) for _ in range(depth))
        self.final = nn.LayerNorm(width) if placement == "pre" else nn.Identity()

    def sinusoids(self, t: int) -> torch.Tensor:
        position = torch.arange(t, dtype=torch.float64)[:, None]
        rate = torch.exp(-math.log(10000.0) * torch.arange(0, self.width, 2) / self.width)
        table = torch.zeros(t, self.width, dtype=torch.float64)
        table[:, 0::2] = torch.sin(position * rate)
        table[:, 1::2] = torch.cos(position * rate)
        return table.float()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids) * math.sqrt(self.width) + self.sinusoids(ids.shape[1])
        for block in self.blocks:
            x = block(x)
        return self.final(x) @ self.embedding.weight.T


def reference_w2_grads(model: PaperLM, inputs: torch.Tensor, targets: torch.Tensor) -> list:
    logits = model(inputs)
    nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return [float(block.fc2.weight.grad.double().norm()) for block in model.blocks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="2,6,12,24")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--report", type=Path, help="a reproduction's directory (xiong.json)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    depths = tuple(int(d) for d in args.depths.split(","))
    sizes = {}
    if args.report is not None:  # the report's own sizes and depths
        saved = json.loads((args.report / "xiong.json").read_text())
        ours = [m for m in saved["measurements"] if m["init"] == "vaswani"]
        sizes = {k: saved["config"][k] for k in SIZES}
        depths = tuple(d for d in depths if any(m["depth"] == d for m in ours))
        if not depths:
            sys.exit(f"{args.report}: no measurement at --depths {args.depths}")
    config = XiongConfig(depths=depths, placements=PLACEMENTS, inits=("vaswani",),
                         seeds=args.seeds, **sizes)  # fmt: skip
    print(machine_line(), file=sys.stderr)
    data = load_lab_data(config.context)
    batch = data.train.sample(config.batch_size, torch.Generator().manual_seed(config.batch_seed))
    (inputs,), targets = batch.inputs, batch.targets
    vocab = data.tokenizer.vocab_size

    if args.report is None:
        started = time.perf_counter()
        ours = [vars(m) for m in run_xiong(config, Path("/tmp/xiong-reference-tformer"))]
        print(f"tformer measured in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    rows = []
    for placement in config.placements:
        for depth in depths:
            theirs = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = PaperLM(vocab, config.d_model, config.n_heads, depth, placement)
                theirs.append(reference_w2_grads(model, inputs, targets)[-1])
            mine = [m["w2_grads"][-1] for m in ours
                    if m["placement"] == placement and m["depth"] == depth]  # fmt: skip
            if not mine:
                continue
            (ref_mean, ref_sd), (our_mean, our_sd) = mean_and_spread(theirs), mean_and_spread(mine)
            rows.append({"placement": placement, "depth": depth, "reference": [ref_mean, ref_sd],
                         "tformer": [our_mean, our_sd],
                         "within": abs(our_mean - ref_mean) <= 2 * ref_sd})  # fmt: skip
    if args.json:
        print(json.dumps({"machine": machine_line(), "rows": rows}))
        return
    print(machine_line())
    print("last layer's ||dL/dW2|| at initialisation, mean ± sd over seeds")
    print(f"{'placement':<10}{'L':>4}  {'reference':>21}  {'tformer vaswani':>21}  within 2 sd")
    for r in rows:
        ref, ours_ = r["reference"], r["tformer"]
        name = {"post": "post-LN", "pre": "pre-LN", "none": "no LN"}[r["placement"]]
        within = "yes" if r["within"] else "NO"
        print(f"{name:<10}{r['depth']:>4}  {ref[0]:>10.4g} ± {ref[1]:<8.3g}  "
              f"{ours_[0]:>10.4g} ± {ours_[1]:<8.3g}  {within}")  # fmt: skip


if __name__ == "__main__":
    main()
