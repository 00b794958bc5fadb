"""Decoding an encoder-decoder model: greedy search and beam search, batched.

Both encode the source once, compute every decoder layer's cross-attention keys and values
of it once, and then feed one target token per step through the decoder's KV caches.

Greedy search takes the most likely token until end-of-sentence. Beam search keeps the K
most likely partial translations (beams), scoring a hypothesis y by its log-probability
normalised by length (Wu et al., 2016, use a similar penalty):

    score(y) = sum_t log p(y_t | y_<t, x) / |y|^alpha      |y| counts the end token

Each step extends every beam by every token and keeps the 2K best candidates: those ending
in end-of-sentence among the top K become finished hypotheses, the best K others the next
beams. A sentence is done when it has K finished hypotheses and either early_stopping is set
or no beam can still beat the worst of them (its current normalised score is lower); at
max_new_tokens the remaining beams finish as they are. alpha = 0 ranks by probability
alone; alpha = 1 by mean log-probability per token; K = 1 is greedy search.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BeamConfig:
    beam_size: int = 4
    length_penalty: float = 1.0  # alpha; 0 ranks by total log-probability
    max_new_tokens: int = 128  # also capped by the model's max_len
    early_stopping: bool = False  # stop a sentence as soon as it has beam_size finished

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _steps(model: nn.Module, max_new_tokens: int) -> int:
    return min(max_new_tokens, model.config.max_len - 1)  # BOS takes position 0


@torch.inference_mode()
def greedy_search(model: nn.Module, src_ids: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Source ids (B, S), padded with pad_id -> each sentence's target ids (no BOS/EOS)."""
    c = model.config
    was_training = model.training
    model.eval()
    try:
        b, steps = src_ids.shape[0], _steps(model, max_new_tokens)
        src_mask = model.source_mask(src_ids)
        memory = model.encode(src_ids, src_mask)
        memory_kvs = model.project_memory(memory)
        caches = model.new_caches(b, max_len=steps + 1)
        token = torch.full((b, 1), c.bos_id, dtype=torch.long, device=src_ids.device)
        outputs: list[list[int]] = [[] for _ in range(b)]
        finished = torch.zeros(b, dtype=torch.bool, device=src_ids.device)
        for _ in range(steps):
            features = model.decode(token, memory, src_mask, caches, memory_kvs)  # (B, 1, C)
            token = model.unembed(features[:, -1]).argmax(-1, keepdim=True)  # (B, 1)
            finished |= token[:, 0] == c.eos_id
            for row, (t, done) in enumerate(
                zip(token[:, 0].tolist(), finished.tolist(), strict=True)
            ):
                if not done:
                    outputs[row].append(t)
            if bool(finished.all()):
                break
        return outputs
    finally:
        model.train(was_training)


@torch.inference_mode()
def beam_search(model: nn.Module, src_ids: torch.Tensor, config: BeamConfig) -> list[list[int]]:
    """Source ids (B, S), padded with pad_id -> each sentence's best target ids (no BOS/EOS)."""
    c = model.config
    was_training = model.training
    model.eval()
    try:
        return _beam_search(model, src_ids, config, c.bos_id, c.eos_id)
    finally:
        model.train(was_training)


def _beam_search(
    model: nn.Module, src_ids: torch.Tensor, config: BeamConfig, bos: int, eos: int
) -> list[list[int]]:
    b, k, alpha = src_ids.shape[0], config.beam_size, config.length_penalty
    steps = _steps(model, config.max_new_tokens)
    device = src_ids.device
    src_mask = model.source_mask(src_ids)
    memory = model.encode(src_ids, src_mask)
    # Every sentence's K beams are K consecutive rows: (B, ...) -> (B*K, ...).
    memory, src_mask = memory.repeat_interleave(k, 0), src_mask.repeat_interleave(k, 0)
    memory_kvs = model.project_memory(memory)
    caches = model.new_caches(b * k, max_len=steps + 1)
    generated = torch.full((b * k, 1), bos, dtype=torch.long, device=device)  # (B*K, 1 + t)
    # The K beams start identical: only the first is live, or the top K would be K copies.
    beam_scores = torch.full((b, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]  # (score, ids)
    done = [False] * b

    def add_finished(sentence: int, total: float, ids: list[int], length: int) -> None:
        hypotheses = finished[sentence]
        hypotheses.append((total / length**alpha, ids))
        hypotheses.sort(key=lambda h: -h[0])
        del hypotheses[k:]  # keep the K best

    for step in range(steps):
        features = model.decode(generated[:, -1:], memory, src_mask, caches, memory_kvs)
        log_p = torch.log_softmax(model.unembed(features[:, -1]).float(), dim=-1)  # (B*K, V)
        v = log_p.shape[-1]
        scores = (beam_scores.view(b * k, 1) + log_p).view(b, k * v)  # (B, K*V)
        top_scores, top_index = scores.topk(min(2 * k, k * v), dim=1)  # (B, 2K)
        rows, tokens, new_scores = [], [], []
        length = step + 1  # tokens generated so far, this one included
        for i in range(b):
            live: list[tuple[float, int, int]] = []  # (score, source row, token)
            if not done[i]:
                for rank, (total, index) in enumerate(
                    zip(top_scores[i].tolist(), top_index[i].tolist(), strict=True)
                ):
                    if total == float("-inf"):
                        break
                    row, token = i * k + index // v, index % v
                    if token == eos:
                        if rank < k:
                            add_finished(i, total, generated[row, 1:].tolist(), length)
                        continue
                    live.append((total, row, token))
                    if len(live) == k:
                        break
                if len(finished[i]) == k:
                    best_live = live[0][0] / length**alpha if live else float("-inf")
                    done[i] = config.early_stopping or finished[i][-1][0] >= best_live
            if done[i]:  # a finished sentence keeps feeding its first row: nobody reads it
                live = [(float("-inf"), i * k, eos)] * k
            live += [(float("-inf"), i * k, eos)] * (k - len(live))
            for total, row, token in live:
                rows.append(row)
                tokens.append(token)
                new_scores.append(total)
        if all(done):
            break
        order = torch.tensor(rows, device=device)
        for cache in caches:
            cache.reorder(order)
        next_tokens = torch.tensor(tokens, device=device)[:, None]
        generated = torch.cat([generated.index_select(0, order), next_tokens], dim=1)
        beam_scores = torch.tensor(new_scores, device=device).view(b, k)
    else:  # out of steps: the live beams finish where they are
        for i in range(b):
            if not done[i]:
                for j in range(k):
                    total = beam_scores[i, j].item()
                    if total > float("-inf"):
                        add_finished(i, total, generated[i * k + j, 1:].tolist(), steps)
    return [hypotheses[0][1] if hypotheses else [] for hypotheses in finished]
