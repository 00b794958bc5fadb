"""The peer that benchmarks/train_shakespeare.py times as a whole process: a program that
does what nanoGPT's train.py does on its published CPU Shakespeare run.

nanoGPT is not on the package index, so it cannot be installed here. Its CPU run is
`python train.py config/train_shakespeare_char.py --device=cpu --compile=False
--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`; this program does the
same work, step for step, with transformers' GPT2LMHeadModel as the model (the same
architecture: learned positions, pre-LayerNorm, exact GELU, tied embeddings; with biases,
as the issue's configuration has them, where train.py's default leaves them out):

- float32 throughout (on the CPU nanoGPT runs without autocast), torch.optim.AdamW (not
  fused on the CPU) with weight decay 0.1 on matrices only, betas (0.9, 0.99), gradients
  clipped to norm 1;
- learning rate 1e-3, linear warm-up over 100 steps, cosine decay to 1e-4 at step 2000;
- batches of 12 random windows of 64 + 1 tokens from train.bin, memory-mapped anew for every
  batch;
- the loss read and printed at every step;
- at steps 0, 250, ..., 2000: the mean loss over 20 random batches of train.bin and of
  val.bin (evaluation mode, no gradients), and a checkpoint (model and optimizer) written
  whenever the validation loss improves, from step 250 on.

    python benchmarks/nanogpt_style.py DATA_DIR OUT_DIR [--steps 2000]

DATA_DIR holds train.bin and val.bin (uint16 token ids) and meta.json ({"vocab_size": V}).
The last line printed is a JSON object with the final train and validation losses and the
seconds spent importing transformers, which nanoGPT does not import.
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

BATCH, CONTEXT, EVAL_EVERY, EVAL_BATCHES = 12, 64, 250, 20
LR, MIN_LR, WARMUP = 1e-3, 1e-4, 100


def learning_rate(step: int, total: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / (WARMUP + 1)
    progress = min(1.0, (step - WARMUP) / max(1, total - WARMUP))
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * progress)) * (LR - MIN_LR)


def batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """12 random windows: inputs and next-token targets, (12, 64) int64 each."""
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    starts = torch.randint(len(tokens) - CONTEXT, (BATCH,))
    x = torch.stack([torch.from_numpy(tokens[i : i + CONTEXT].astype(np.int64)) for i in starts])
    y = torch.stack(
        [torch.from_numpy(tokens[i + 1 : i + 1 + CONTEXT].astype(np.int64)) for i in starts]
    )
    return x, y


def gpt2_model(vocab_size: int) -> torch.nn.Module:
    """transformers' GPT-2 in nanoGPT's CPU Shakespeare shape, without dropout."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=CONTEXT,
        n_embd=128,
        n_layer=4,
        n_head=4,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # GPT-2's 50256 is outside a character vocabulary
        eos_token_id=None,
    )
    return transformers.GPT2LMHeadModel(config)


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x, use_cache=False).logits  # nanoGPT keeps no key/value cache
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, data_dir: Path) -> dict[str, float]:
    model.eval()
    losses = {}
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        values = [loss_of(model, *batch(path)).item() for _ in range(EVAL_BATCHES)]
        losses[split] = sum(values) / len(values)
    model.train()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    import transformers  # noqa: F401  nanoGPT imports none: the benchmark takes this time off

    import_seconds = time.perf_counter() - start
    torch.manual_seed(1337)
    vocab_size = json.loads((args.data_dir / "meta.json").read_text())["vocab_size"]
    model = gpt2_model(vocab_size).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99))
    best_val = float("inf")
    losses = {}
    for step in range(args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps)
        if step % EVAL_EVERY == 0:
            losses = estimate_loss(model, args.data_dir)
            print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if losses["val"] < best_val:
                best_val = losses["val"]
                if step > 0:
                    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                    torch.save(state, args.out_dir / "ckpt.pt")
        if step == args.steps:
            break
        loss = loss_of(model, *batch(args.data_dir / "train.bin"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"iter {step}: loss {loss.item():.4f}")
    summary = {
        "train_loss": losses["train"],
        "val_loss": losses["val"],
        "transformers_import_seconds": round(import_seconds, 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
