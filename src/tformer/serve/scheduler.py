"""Continuous batching: many requests decoded together, each joining and leaving the
running batch at any step.

    waiting queue --admit (prefill into a free slot)--> running rows --finish--> gone
                                                        one decode step per loop: every row
                                                        gets one token, at its own position

Each running request owns one slot of a preallocated SlotCache per layer
(nn/slot_cache.py): its prompt's keys and values sit at positions 0..T-1 of its slot, and
every decoding step appends one token to every running slot at once, each at its own
position, with a mask hiding what lies beyond each row. Rows are slots 0..B-1: when a
request leaves, the last row moves into its slot, so the batch stays a plain prefix.

One loop (`step`):
  0. run the calls other threads handed over (`call`: work that needs the model to itself,
     such as /v1/inspect's hooked forward pass), between two steps;
  1. forget the requests cancelled since the last step (a client that went away);
  2. admit waiting requests into free slots: their prompts are prefilled together, one
     right-padded batch (the running rows wait for that prefill, not for a batch to
     drain), and each one's first token is drawn from the prefill's logits; a batch holds
     at most PREFILL_BUDGET positions (its rows times its longest prompt; one prompt
     always goes), so a burst of arrivals does not hold the running rows up for long;
     with no row running nobody waits on the prefill, and it may hold IDLE_PREFILL_BUDGET
     (a burst of arrivals at an idle server then gets its first tokens together);
  3. one decoding step for every running row: prefill/decode_step's arithmetic
     (tformer.generate.decode), per-row positions, and the samplers of
     tformer.generate.decode.next_token with each request's own SamplingConfig and
     generator, so a request's tokens do not depend on what else runs beside it.
The batch thus grows with the load, up to the slots there are (--max-batch).

Tokens become text with tformer.generate.text.TextCutter: no piece ends inside a UTF-8
character, text that may still become a stop string is held back, and a matched stop
string ends the request without being shown. Every event a request sees goes to its
`emit` callback, on the scheduler's thread.
"""

import math
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import nn

from tformer.generate.decode import SamplingConfig, decode_slots, next_token, prefill_slots
from tformer.generate.limits import LENGTH, STOP
from tformer.generate.sampling import mask_beyond
from tformer.generate.text import TextCutter
from tformer.serve.metrics import Metrics
from tformer.tokenizers import Tokenizer

# Positions (rows x longest prompt) prefilled in one loop before the running rows' step,
# and when no row is running (a bound on the prefill's memory only).
PREFILL_BUDGET = 512
IDLE_PREFILL_BUDGET = 4 * PREFILL_BUDGET
CANCELLED = "cancelled"  # a finish reason no client sees: its connection is gone
ERROR = "error"


@dataclass
class TokenLogprob:
    """One token drawn, its log-probability under the model, and the most likely
    alternatives (id, log-probability), best first."""

    id: int
    logprob: float | None  # None: the first token of a prompt, which nothing predicts
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What a request learns after a step: text ready to show (maybe ""), the tokens drawn
    since its last event, and, on its last event, why it ended."""

    text: str
    tokens: list[TokenLogprob]
    finish_reason: str | None = None  # "stop", "length", CANCELLED or ERROR
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None  # with echo: the prompt's own
    error: str | None = None


@dataclass(eq=False)  # jobs are told apart by identity
class Job:
    """One sequence to generate: a prompt's ids, how to sample, where events go."""

    prompt: list[int]
    config: SamplingConfig  # max_new_tokens, eos_id and vocab_limit included
    stops: list[str]
    emit: Callable[[Event], None]
    logprobs: int | None = None  # None: no log-probabilities; k: the k most likely too
    prompt_logprobs: bool = False
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


class Row:
    """A running job: its slot's state between steps."""

    def __init__(self, job: Job, tokenizer: Tokenizer, device: torch.device) -> None:
        self.job = job
        self.cutter = TextCutter(tokenizer, job.stops)
        seed = job.config.seed if job.config.seed is not None else secrets.randbits(48)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.history = list(job.prompt)  # prompt and drawn ids: the repetition penalty's
        self.drawn: list[int] = []
        self.position = len(job.prompt)  # where the next token fed in is written
        self.token = -1  # the last token drawn, fed in at the next step
        self.pending: list[TokenLogprob] = []
        self.last_event = time.perf_counter()
        self.started = False


class QueueFull(Exception):
    """The waiting queue holds --max-queue requests already."""


class Scheduler:
    """Owns the model, its slot caches and the queue; `step` runs one loop; `run` loops on
    a thread until `close`. submit/cancel are safe from any thread."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        max_batch: int,
        max_queue: int,
        metrics: "Metrics | None" = None,
    ) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = model.config.max_len
        self.device = next(model.parameters()).device
        self.caches = model.new_slot_caches(max_batch)  # in the model's dtype
        self.rows: list[Row] = []  # row i is slot i
        self.waiting: deque[Job] = deque()
        self.calls: deque[tuple[Callable[[], object], Future]] = deque()
        self.condition = threading.Condition()
        self.closed = False
        self.metrics = metrics

    # -- from any thread -------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs together (a request's n choices), or raise QueueFull."""
        with self.condition:
            if self.closed:
                raise QueueFull("the server is shutting down")
            # Room: the free slots and the queue; an idle server takes any request.
            room = self.max_queue + self.max_batch - len(self.rows)
            if (self.rows or self.waiting) and len(self.waiting) + len(jobs) > room:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.extend(jobs)
            self._report()
            self.condition.notify()

    def call(self, work: Callable[[], object]) -> Future:
        """Run work() on the scheduler's thread between two steps -> a Future of its
        result (or exception); QueueFull when --max-queue calls wait already."""
        future: Future = Future()
        with self.condition:
            if self.closed:
                raise QueueFull("the server is shutting down")
            if self.calls and len(self.calls) >= self.max_queue:
                raise QueueFull(f"{len(self.calls)} requests are waiting already")
            self.calls.append((work, future))
            self.condition.notify()
        return future

    def cancel(self, job: Job) -> None:
        """Drop a job: from the queue at once, from the running batch at the next step."""
        with self.condition:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
                self._report()
                job.emit(Event("", [], CANCELLED))
            self.condition.notify()

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify()

    # -- on the scheduler's thread -------------------------------------------------------
    def run(self) -> None:
        while True:
            with self.condition:
                while not self.closed and not self.rows and not self.waiting and not self.calls:
                    self.condition.wait()
                if self.closed:
                    break
            try:
                self.step()
            except Exception as error:  # a bug must not leave requests hanging
                traceback.print_exc(file=sys.stderr)
                self._fail_all(f"internal error while decoding: {error}")
        self._fail_all("the server shut down before this request finished", CANCELLED)

    @torch.inference_mode()
    def step(self) -> None:
        """Run the calls handed over, forget cancelled rows, admit waiting jobs, then one
        decoding step for all."""
        self._run_calls()
        self._drop(lambda row: row.job.cancelled, CANCELLED)
        admitted, width = [], 0
        budget = PREFILL_BUDGET if self.rows else IDLE_PREFILL_BUDGET
        while len(self.rows) + len(admitted) < self.max_batch:
            with self.condition:
                if not self.waiting:
                    break
                # The batch is right-padded: it costs its rows times its longest prompt.
                cost = max(width, len(self.waiting[0].prompt)) * (len(admitted) + 1)
                if admitted and cost > budget:
                    break  # the next step's batch takes it
                job = self.waiting.popleft()
                self._report()
            if job.cancelled:  # cancelled between leaving the queue and here
                job.emit(Event("", [], CANCELLED))
                continue
            admitted.append(job)
            width = max(width, len(job.prompt))
        if admitted:
            self._admit(admitted)
        self._drop(lambda row: row.token < 0, None)  # rows that ended at their first token
        if self.rows:
            self._decode()
        self._report()

    def _run_calls(self) -> None:
        """The calls waiting now; those that come meanwhile wait for the next step."""
        if not self.calls:  # the usual case, every step: no lock taken
            return
        with self.condition:
            waiting = len(self.calls)
        for _ in range(waiting):
            with self.condition:
                if not self.calls:
                    return
                work, future = self.calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up
            try:
                future.set_result(work())
            except Exception as error:  # the caller's to report
                future.set_exception(error)

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the jobs' prompts as one right-padded batch into the next free slots and
        draw each one's first token."""
        rows = [Row(job, self.tokenizer, self.device) for job in jobs]
        lengths = [len(job.prompt) for job in jobs]
        features = prefill_slots(
            self.model, [job.prompt for job in jobs], self.caches, len(self.rows)
        )
        last = features[torch.arange(len(jobs)), torch.tensor(lengths) - 1]  # (N, C)
        logits = self.model.unembed(last).float()  # (N, V)
        self.rows.extend(rows)
        self._report()  # busy before the first token reaches anyone
        if self.metrics is not None:
            self.metrics.prompt_tokens(sum(lengths))
        prompt_logprobs = [
            self._prompt_logprobs(job, features[i, : lengths[i]]) if job.prompt_logprobs else None
            for i, job in enumerate(jobs)
        ]
        self._advance(rows, logits, prompt_logprobs)

    def _prompt_logprobs(self, job: Job, features: torch.Tensor) -> list[TokenLogprob]:
        """(T, C) a prompt's features -> each prompt token's log-probability given the ones
        before it (the first has none)."""
        logits = self.model.unembed(features).float()  # (T, V)
        return [TokenLogprob(job.prompt[0], None, [])] + [
            self._logprob(logits[t - 1], job.prompt[t], job) for t in range(1, len(job.prompt))
        ]

    def _decode(self) -> None:
        tokens = torch.tensor([row.token for row in self.rows], device=self.device)  # (B,)
        positions = torch.tensor([row.position for row in self.rows], device=self.device)
        logits = decode_slots(self.model, tokens, positions, self.caches).float()  # (B, V)
        for row in self.rows:
            row.position += 1
        self._advance(self.rows, logits, [None] * len(self.rows))
        self._drop(lambda row: row.token < 0, None)

    def _advance(
        self,
        rows: list[Row],
        logits: torch.Tensor,
        prompt_logprobs: list[list[TokenLogprob] | None],
    ) -> None:
        """Draw each row's next token from its logits (B, V) and tell its job."""
        chosen = self._choose(rows, logits)
        now = time.perf_counter()
        for i, (row, token) in enumerate(zip(rows, chosen, strict=True)):
            job, config = row.job, row.job.config
            if self.metrics is not None:
                if row.started:
                    self.metrics.inter_token(now - row.last_event)
                else:
                    self.metrics.first_token(now - job.submitted)
            row.started, row.last_event = True, now
            reason = None
            piece = ""
            if config.eos_id is not None and token == config.eos_id:
                reason = STOP
            else:
                if self.metrics is not None:
                    self.metrics.generated(1)
                row.drawn.append(token)
                row.history.append(token)
                if job.logprobs is not None:
                    row.pending.append(self._logprob(logits[i], token, job))
                piece = row.cutter.add(token)
                if row.cutter.stopped:
                    reason = STOP
                elif len(row.drawn) >= config.max_new_tokens or row.position >= self.max_len:
                    reason = LENGTH
            if reason is not None and not row.cutter.stopped:
                piece += row.cutter.finish()
            row.token = token if reason is None else -1
            if piece or reason is not None or row.pending or prompt_logprobs[i] is not None:
                event = Event(piece, row.pending, reason, len(row.drawn), prompt_logprobs[i])
                row.pending = []
                job.emit(event)

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token: plain greedy rows at once, the others with their own
        sampler and generator (tformer.generate.decode.next_token)."""
        chosen = [0] * len(rows)
        plain = [i for i, row in enumerate(rows) if _plain_greedy(row.job.config)]
        if plain:
            limit = rows[plain[0]].job.config.vocab_limit
            index = torch.tensor(plain, device=logits.device)
            picks = mask_beyond(logits.index_select(0, index), limit).argmax(-1).tolist()
            for i, token in zip(plain, picks, strict=True):
                chosen[i] = token
        for i, row in enumerate(rows):
            if i in plain:
                continue
            config = row.job.config
            seen = None
            if config.repetition_penalty != 1.0:
                seen = torch.tensor([row.history], device=logits.device)
            token = next_token(logits[i : i + 1], config, row.generator, seen, [row.drawn])
            chosen[i] = int(token)
        return chosen

    def _logprob(self, logits: torch.Tensor, token: int, job: Job) -> TokenLogprob:
        """(V,) logits -> the token's log-probability and the k most likely alternatives,
        over the ids the tokenizer can decode."""
        logp = torch.log_softmax(mask_beyond(logits[None], job.config.vocab_limit)[0], -1)
        k = min(job.logprobs or 0, int(torch.isfinite(logp).sum()))
        top = []
        if k > 0:
            values, ids = logp.topk(k)
            top = [(int(i), _finite(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return TokenLogprob(token, _finite(float(logp[token])), top)

    def _drop(self, gone: Callable[[Row], bool], reason: str | None) -> None:
        """Remove the rows `gone` picks, moving the last rows into their slots."""
        i = 0
        while i < len(self.rows):
            row = self.rows[i]
            if not gone(row):
                i += 1
                continue
            if reason is not None:
                row.job.emit(Event("", [], reason, len(row.drawn)))
            last = len(self.rows) - 1
            if i != last:
                moved = self.rows[last]
                for cache in self.caches:
                    cache.move(last, i, moved.position)
                self.rows[i] = moved
            self.rows.pop()
        self._report()

    def _fail_all(self, message: str, reason: str = ERROR) -> None:
        rows, self.rows = self.rows, []
        with self.condition:
            jobs, self.waiting = list(self.waiting), deque()
            calls, self.calls = list(self.calls), deque()
        for job in [row.job for row in rows] + jobs:
            job.emit(Event("", [], reason, 0, error=message))
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(QueueFull(message))
        self._report()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.load(len(self.rows), len(self.waiting), self.max_batch)


def _plain_greedy(config: SamplingConfig) -> bool:
    return (
        not config.do_sample
        and config.repetition_penalty == 1.0
        and not config.presence_penalty
        and not config.frequency_penalty
    )


def _finite(x: float) -> float:
    """JSON has no -inf: a log-probability of a token that cannot be drawn reads -9999."""
    return x if math.isfinite(x) else -9999.0
