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

What it costs: the first step runs one beam a sentence (the K are alike); a sentence's K
beams read its one row of the memory's keys and values; a beam's candidates are its 2K
most likely tokens (one pass over the logits, kernels/top_logits.c on the CPU); and a
beam goes on from its parent's past where that lies in the caches, as a row does when
finished sentences leave (nn/kv_cache.follow_paths): the one-call decoding step copies
no cache row at all, the plain path one gather a step.
"""

from dataclasses import dataclass

import torch
from torch import nn

from tformer import kernels
from tformer.checks import check_number
from tformer.errors import ConfigError
from tformer.generate.decode import Prompts, prompt_rows
from tformer.generate.sampling import mask_beyond
from tformer.nn.kv_cache import follow_paths
from tformer.nn.modes import evaluating


@dataclass
class BeamConfig:
    beam_size: int = 4
    length_penalty: float = 1.0  # alpha; 0 ranks by total log-probability
    max_new_tokens: int = 128  # also capped by the model's max_len
    early_stopping: bool = False  # stop a sentence as soon as it has beam_size finished
    # Ids from here on are never chosen: the tokenizer's size, when the model's target
    # vocabulary is larger, so every translation can be decoded.
    vocab_limit: int | None = None

    def __post_init__(self) -> None:
        check_number("beam_size", self.beam_size, integer=True, low=1)
        check_number("length_penalty", self.length_penalty)
        check_number("max_new_tokens", self.max_new_tokens, integer=True, low=1)
        if not isinstance(self.early_stopping, bool):
            raise ConfigError(f"early_stopping must be True or False, got {self.early_stopping!r}")
        check_number("vocab_limit", self.vocab_limit, integer=True, low=1, optional=True)


def source_batch(model: nn.Module, src_ids: Prompts) -> torch.Tensor:
    """Source ids as a tensor (B, S) or (S,), a list of ids or a list of lists, checked
    against the source vocabulary -> (B, S) padded on the right with pad_id."""
    rows = prompt_rows(src_ids, model.config.src_vocab_size, "src_ids")
    width = max(len(r) for r in rows)
    padded = [r + [model.config.pad_id] * (width - len(r)) for r in rows]
    return torch.tensor(padded, device=next(model.parameters()).device)


def _steps(model: nn.Module, max_new_tokens: int) -> int:
    return min(max_new_tokens, model.config.max_len - 1)  # BOS takes position 0


def never_padding(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Logits (..., V), in place, with the padding token's at -inf: it is no word of any
    sentence, and Marian's engines (seq2seq_marian) never emit it either, so the scores are
    theirs. For logits the caller made (a step's output): no copy of V a row."""
    logits[..., model.config.pad_id] = float("-inf")
    return logits


def until_end(ids: list[int], eos: int) -> list[int]:
    """The ids before the first end token (all of them if there is none)."""
    return ids[: ids.index(eos)] if eos in ids else ids


@torch.inference_mode()
def greedy_search(
    model: nn.Module, src_ids: Prompts, max_new_tokens: int, vocab_limit: int | None = None
) -> list[list[int]]:
    """Source ids (B, S), padded with pad_id (or lists of ids) -> each sentence's target ids
    (no BOS/EOS); ids from vocab_limit on are never chosen."""
    check_number("max_new_tokens", max_new_tokens, integer=True, low=1)
    check_number("vocab_limit", vocab_limit, integer=True, low=1, optional=True)
    src_ids = source_batch(model, src_ids)
    c = model.config
    with evaluating(model):
        b, steps = src_ids.shape[0], _steps(model, max_new_tokens)
        src_mask = model.source_mask(src_ids)
        memory = model.encode(src_ids, src_mask)
        memory_kvs = model.project_memory(memory)
        caches = model.new_caches(b, max_len=steps + 1)
        token = torch.full((b, 1), c.bos_id, dtype=torch.long, device=src_ids.device)
        outputs: list[list[int]] = [[] for _ in range(b)]
        live = list(range(b))  # the sentence of each row still decoded
        for _ in range(steps):
            features = model.decode(token, memory, src_mask, caches, memory_kvs)  # (N, 1, C)
            logits = never_padding(model, mask_beyond(model.unembed(features[:, -1]), vocab_limit))
            token = best_token(logits)  # (N, 1)
            chosen = token[:, 0].tolist()
            for sentence, t in zip(live, chosen, strict=True):
                outputs[sentence].append(t)
            if c.eos_id in chosen:  # the finished sentences leave the batch
                rows = [i for i, t in enumerate(chosen) if t != c.eos_id]
                if not rows:
                    break
                live = [live[i] for i in rows]
                keep = torch.tensor(rows, device=src_ids.device)
                token, memory, src_mask = token[keep], memory[keep], src_mask[keep]
                memory_kvs = [(k[keep], v[keep]) for k, v in memory_kvs]
                follow_paths(caches, keep)  # nothing moves in the caches
        return [until_end(row, c.eos_id) for row in outputs]


@torch.inference_mode()
def beam_search(model: nn.Module, src_ids: Prompts, config: BeamConfig) -> list[list[int]]:
    """Source ids (B, S), padded with pad_id (or lists of ids) -> each sentence's best target
    ids (no BOS/EOS)."""
    if not isinstance(config, BeamConfig):
        raise ConfigError(f"config must be a BeamConfig, got {type(config).__name__}")
    src_ids = source_batch(model, src_ids)
    c = model.config
    with evaluating(model):
        return _beam_search(model, src_ids, config, c.bos_id, c.eos_id)


def best_token(logits: torch.Tensor) -> torch.Tensor:
    """Logits (M, V) -> each row's most likely id (M, 1), the lower id on a tie, as
    argmax; on the CPU one pass of the C kernels over the rows' logits (top_logits.c), in
    parallel. (A row with a NaN logit may get another token there: argmax picks the NaN.)"""
    library = kernels.load() if logits.device.type == "cpu" else None
    if library is not None and logits.dtype == torch.float32:
        return library.top_logits(logits, 1, log_sum_exp=False)[2]
    return logits.argmax(-1, keepdim=True)


def most_likely(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (M, V) -> each row's n most likely tokens, best first: their
    log-probabilities log_softmax(logits) (M, n) and their ids (M, n). On the CPU one pass
    of the C kernels (kernels/top_logits.c) instead of a log-softmax of all V and a top-n."""
    library = kernels.load() if logits.device.type == "cpu" else None
    if library is not None and logits.dtype == torch.float32:
        lse, values, ids = library.top_logits(logits, n)
        return values - lse[:, None], ids
    values, ids = logits.topk(n, dim=-1)
    return values - logits.logsumexp(dim=-1, keepdim=True), ids


def _beam_search(
    model: nn.Module, src_ids: torch.Tensor, config: BeamConfig, bos: int, eos: int
) -> list[list[int]]:
    b, k, alpha = src_ids.shape[0], config.beam_size, config.length_penalty
    steps = _steps(model, config.max_new_tokens)
    if steps == 0:  # a window of one position: BOS fills it, no word fits
        return [[] for _ in range(b)]
    device = src_ids.device
    src_mask = model.source_mask(src_ids)
    memory = model.encode(src_ids, src_mask)
    # Every sentence's K beams are K consecutive rows of the decoder, (B*K, ...), which read
    # the sentence's one row of the memory, its keys and values and its mask, (B, ...).
    memory_kvs = model.project_memory(memory)
    caches = model.new_caches(b * k, max_len=steps + 1)
    # The first step has one beam a sentence (K would be K copies of it), row i in slot i.
    width = 1  # beams a sentence: 1, then K
    follow_paths(caches, torch.arange(b, device=device))
    generated = torch.full((b, 1), bos, dtype=torch.long, device=device)  # (B*width, 1 + t)
    beam_scores = torch.zeros(b, 1, device=device)  # (B, width)
    first_row = torch.arange(b, device=device)[:, None]  # (B, 1) each sentence's first row
    # The finished hypotheses, (score, ids) best first, at most K a sentence; how many each
    # sentence still searched has and the worst one's score, as tensors for the stopping test.
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    n_finished = torch.zeros(b, dtype=torch.long, device=device)
    worst_finished = torch.full((b,), float("-inf"), dtype=torch.float64, device=device)
    live = list(range(b))  # the sentence of each group of K rows still searched

    def add_finished(i: int, total: float, ids: list[int], length: int) -> None:
        hypotheses = finished[live[i]]
        hypotheses.append((total / length**alpha, ids))
        hypotheses.sort(key=lambda h: -h[0])
        del hypotheses[k:]  # keep the K best
        n_finished[i] = len(hypotheses)
        worst_finished[i] = hypotheses[-1][0]

    for step in range(steps):
        features = model.decode(generated[:, -1:], memory, src_mask, caches, memory_kvs)
        logits = mask_beyond(model.unembed(features[:, -1]).float(), config.vocab_limit)
        logits = never_padding(model, logits)  # (B*width, V)
        # A sentence's 2K best candidates are among its beams' own 2K best tokens each: each
        # beam has one end token, so at least K of them go on.
        n = min(2 * k, logits.shape[-1])
        best_log_p, best_tokens = most_likely(logits, n)  # (B*width, n)
        scores = (beam_scores.view(-1, 1) + best_log_p).view(b, width * n)  # (B, width*n)
        if width * n < 2 * k:  # fewer candidates than 2K (a vocabulary smaller than 2K)
            scores = nn.functional.pad(scores, (0, 2 * k - width * n), value=float("-inf"))
        top_scores, top_index = scores.topk(2 * k, dim=1)  # (B, 2K), best first
        # a padding candidate (-inf, a dead beam if it goes on) extends a real one
        top_index = top_index.clamp(max=width * n - 1)
        top_rows = first_row + top_index // n  # (B, 2K) the beam each extends
        top_tokens = best_tokens.view(b, width * n).gather(1, top_index)
        if width == 1:  # from the second step on, K beams a sentence
            width, first_row = k, torch.arange(b, device=device)[:, None] * k
        ends = top_tokens == eos
        length = step + 1  # tokens generated so far, this one included

        # An end token among a sentence's K best candidates finishes a hypothesis.
        new_ends = ends[:, :k] & (top_scores[:, :k] > float("-inf"))
        for i, rank in new_ends.nonzero().tolist():  # few: sentences end once or so
            ids = generated[top_rows[i, rank], 1:].tolist()
            add_finished(i, top_scores[i, rank].item(), ids, length)

        # The K best candidates that do not end go on; a stable sort keeps their order.
        going_on = torch.sort(ends.to(torch.uint8), dim=1, stable=True).indices[:, :k]
        beam_scores = top_scores.gather(1, going_on)  # (B, K), best first
        rows, tokens = top_rows.gather(1, going_on), top_tokens.gather(1, going_on)

        # A sentence with K finished hypotheses is done when it stops early, or when its
        # best beam still going, scored as it stands now, is no better than the worst of
        # them (the usual heuristic: with alpha > 0 a longer beam could still overtake).
        best_going_on = beam_scores[:, 0].double() / length**alpha
        can_stop = (worst_finished >= best_going_on) | config.early_stopping
        done = (n_finished == k) & can_stop
        if done.any():  # done sentences leave the batch: each step computes the rest
            going = (~done).nonzero()[:, 0]
            if going.numel() == 0:
                break
            live = [live[i] for i in going.tolist()]
            beam_scores, rows, tokens = beam_scores[going], rows[going], tokens[going]
            n_finished, worst_finished = n_finished[going], worst_finished[going]
            b = len(live)
            first_row = first_row[:b]
            memory, src_mask = memory[going], src_mask[going]
            memory_kvs = [(mk[going], mv[going]) for mk, mv in memory_kvs]

        order = rows.flatten()  # (B*K,) the rows, of the batch before, that go on
        # Each beam goes on from its row's past, wherever that lies in the caches (nothing
        # is copied), and writes its next positions in a slot of its own.
        follow_paths(caches, order)
        generated = torch.cat([generated.index_select(0, order), tokens.view(b * k, 1)], dim=1)
    else:  # out of steps: the live beams finish where they are
        alive = beam_scores > float("-inf")
        for i, j in alive.nonzero().tolist():
            add_finished(i, beam_scores[i, j].item(), generated[i * width + j, 1:].tolist(), steps)
    return [hypotheses[0][1] if hypotheses else [] for hypotheses in finished]
