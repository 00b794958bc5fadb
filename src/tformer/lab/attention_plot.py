"""Pictures of attention: heatmaps of softmax(Q K^T / sqrt(d_k) + M), one per head.

Row t of a head's picture is the distribution query t puts over the keys s (each row sums
to 1); in causal attention everything right of the diagonal is 0.
"""

import math
from pathlib import Path

import torch

from tformer.files import atomic_write
from tformer.train.plots import new_figure


def token_label(text: str) -> str:
    """A token as an axis label: whitespace made visible, so ' the' and 'the' differ."""
    return text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t") or "∅"


def plot_attention(
    weights: torch.Tensor,
    query_tokens: list[str],
    key_tokens: list[str],
    heads: list[int],
    title: str,
    path: str | Path,
) -> Path:
    """weights (H, T, S) of one layer -> a PNG with one heatmap per head in `heads`."""
    if weights.dim() != 3 or weights.shape[1:] != (len(query_tokens), len(key_tokens)):
        raise ValueError(
            f"weights of shape {tuple(weights.shape)} do not match {len(query_tokens)} query "
            f"and {len(key_tokens)} key tokens"
        )
    columns = min(len(heads), 4)
    rows = math.ceil(len(heads) / columns)
    cell = max(2.5, 0.22 * max(len(query_tokens), len(key_tokens)) + 1.0)
    fig = new_figure(figsize=(cell * columns, cell * rows), dpi=110)
    axes = fig.subplots(rows, columns, squeeze=False)
    labels_q = [token_label(t) for t in query_tokens]
    labels_k = [token_label(t) for t in key_tokens]
    fontsize = 8 if max(len(labels_q), len(labels_k)) <= 24 else 6
    for ax in axes.flat[len(heads) :]:
        ax.axis("off")
    for i, (ax, head) in enumerate(zip(axes.flat, heads, strict=False)):
        image = ax.imshow(weights[head].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {head}", fontsize=9)
        ax.set_xticks(range(len(labels_k)), labels_k, rotation=90, fontsize=fontsize)
        ax.set_xlabel("key", fontsize=8)
        if i % columns == 0:  # the query labels once per row: they would overlap the left panel
            ax.set_yticks(range(len(labels_q)), labels_q, fontsize=fontsize)
            ax.set_ylabel("query", fontsize=8)
        else:
            ax.set_yticks([])
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight")
    fig.suptitle(title)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return path
