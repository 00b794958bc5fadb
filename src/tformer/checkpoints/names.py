"""Translating a state dict through a name table, with every problem named at once.

A model that reads a foreign layout supplies a table of rows

    (checkpoint name, tformer name, stored transposed)

e.g. GPT-2's ("h.0.attn.c_attn.weight", "blocks.0.attn.w_qkv.weight", True): Conv1D layers
store W as (in, out), the transpose of nn.Linear's (out, in). Loading checks that every row's
tensor is there with the shape the model expects and that nothing else is, and reports the
missing, mismatched and unexpected tensors together.
"""

import torch

from tformer.checkpoints.errors import CheckpointError

NameTable = list[tuple[str, str, bool]]  # (checkpoint name, tformer name, transposed)


def short(items: list[str], limit: int = 6) -> str:
    """The first few items, and how many more there are."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def strip_prefix(
    tensors: dict[str, torch.Tensor], prefix: str, source: str
) -> dict[str, torch.Tensor]:
    """The tensors with `prefix` removed where present; a name stored both with and without
    it is an error."""
    unprefixed = {k.removeprefix(prefix) for k in tensors}
    if len(unprefixed) != len(tensors):
        both = sorted(k for k in tensors if not k.startswith(prefix) and prefix + k in tensors)
        raise CheckpointError(
            f"{source}: tensors stored twice, with and without the {prefix!r} prefix: {short(both)}"
        )
    return {k.removeprefix(prefix): v for k, v in tensors.items()}


def tensors_to_table(
    state: dict[str, torch.Tensor], table: NameTable, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """tformer tensors -> the checkpoint's names (after `prefix`) and layout."""
    return {
        prefix + theirs: (state[ours].t() if transposed else state[ours]).contiguous()
        for theirs, ours, transposed in table
    }


def tensors_from_table(
    tensors: dict[str, torch.Tensor],
    table: NameTable,
    shapes: dict[str, tuple[int, ...]],
    source: str,
    what: str,
    ignored_suffixes: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors -> tformer's names and layout, checking each against the
    model's `shapes` (by tformer name). Names ending in `ignored_suffixes` are skipped;
    `what` names the model in the error ("GPT-2")."""
    missing, mismatched, out = [], [], {}
    for theirs, ours, transposed in table:
        if theirs not in tensors:
            missing.append(theirs)
            continue
        want = shapes[ours][::-1] if transposed else shapes[ours]
        tensor = tensors[theirs]
        if tuple(tensor.shape) != want:
            mismatched.append(f"{theirs} {tuple(tensor.shape)}, config.json implies {want}")
            continue
        out[ours] = tensor.t().contiguous() if transposed else tensor
    known = {theirs for theirs, _, _ in table}
    unexpected = sorted(k for k in tensors if k not in known and not k.endswith(ignored_suffixes))
    problems = []
    if missing:
        problems.append(f"missing tensors: {short(missing)}")
    if mismatched:
        problems.append(f"tensors whose shape does not match config.json: {short(mismatched)}")
    if unexpected:
        problems.append(f"tensors a {what} does not have: {short(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{source}: not a {what} checkpoint that matches its config.json; "
            + "; ".join(problems)
        )
    return out
