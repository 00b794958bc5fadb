"""The scheduler without HTTP: requests joining at different steps get exactly what each
gets alone from tformer.generate, greedy and seeded sampling alike, and cancelled ones
leave."""

import pytest
import torch

from tformer.generate.decode import SamplingConfig, generate_ids
from tformer.models.gpt2 import GPT2
from tformer.models.gpt2_config import GPT2Config
from tformer.serve.scheduler import CANCELLED, Job, QueueFull, Scheduler


class Letters:
    """A tokenizer whose token i is the letter chr(65 + i % 26)."""

    vocab_size, eos_id = 90, None

    def decode_bytes(self, ids):
        return bytes(65 + i % 26 for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode()


def tiny() -> GPT2:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=90, max_len=48, d_model=32, n_layers=2, n_heads=4, dropout=0.0)
    return GPT2(config).eval()


def run(scheduler: Scheduler, jobs: list[Job], join_every: int) -> None:
    """Submit the jobs one every `join_every` steps (0: all at once, so their prompts are
    prefilled as one padded batch), then step until all are done."""
    pending = list(jobs)
    if join_every == 0:
        scheduler.submit(pending)
        pending = []
    step = 0
    while pending or scheduler.rows or scheduler.waiting:
        if pending and step % join_every == 0:
            scheduler.submit([pending.pop(0)])
        scheduler.step()
        step += 1


def job(prompt, config, events, logprobs=0):
    return Job(prompt, config, [], events.append, logprobs=logprobs)


@pytest.mark.parametrize("join_every", [2, 0])
def test_staggered_or_batched_requests_get_what_each_gets_alone(join_every):
    model = tiny()
    scheduler = Scheduler(model, Letters(), max_batch=3 if join_every else 6, max_queue=10)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10], [11], [3, 3, 3, 3], [7, 8], [9] * 7]
    configs = [
        SamplingConfig(max_new_tokens=10 + i, do_sample=False)
        if i % 2 == 0
        else SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=i)
        for i in range(len(prompts))
    ]
    events = [[] for _ in prompts]
    jobs = [job(p, c, e) for p, c, e in zip(prompts, configs, events, strict=True)]
    run(scheduler, jobs, join_every)
    for prompt, config, got in zip(prompts, configs, events, strict=True):
        ids = [t.id for event in got for t in event.tokens]
        assert ids == generate_ids(model, prompt, config)
        assert "".join(e.text for e in got) == Letters().decode(ids)
        assert got[-1].finish_reason == "length"
        assert got[-1].completion_tokens == config.max_new_tokens


def test_a_cancelled_request_leaves_and_the_others_go_on():
    model = tiny()
    scheduler = Scheduler(model, Letters(), max_batch=2, max_queue=1)
    config = SamplingConfig(max_new_tokens=20, do_sample=False)
    kept, gone = [], []
    jobs = [job([1, 2], config, gone), job([4, 5, 6], config, kept)]
    scheduler.submit(jobs)
    scheduler.step()
    scheduler.step()
    scheduler.cancel(jobs[0])
    scheduler.step()
    assert gone[-1].finish_reason == CANCELLED and len(scheduler.rows) == 1
    while scheduler.rows:
        scheduler.step()
    assert [t.id for e in kept for t in e.tokens] == generate_ids(model, [4, 5, 6], config)


def test_the_queue_is_bounded():
    scheduler = Scheduler(tiny(), Letters(), max_batch=1, max_queue=1)
    config = SamplingConfig(max_new_tokens=5, do_sample=False)
    scheduler.submit([job([1], config, [])])
    scheduler.step()  # running: the one slot is busy
    scheduler.submit([job([2], config, [])])  # waits
    with pytest.raises(QueueFull):
        scheduler.submit([job([3], config, [])])


def test_prefill_budget_is_larger_while_no_row_runs(monkeypatch):
    from tformer.serve import scheduler as module

    monkeypatch.setattr(module, "PREFILL_BUDGET", 8)  # positions: rows x longest prompt
    monkeypatch.setattr(module, "IDLE_PREFILL_BUDGET", 12)
    scheduler = Scheduler(tiny(), Letters(), max_batch=8, max_queue=10)
    config = SamplingConfig(max_new_tokens=20, do_sample=False)
    scheduler.submit([job([1, 2, 3, 4], config, []) for _ in range(4)])
    scheduler.step()
    assert len(scheduler.rows) == 3  # idle: 3 x 4 positions; 4 x 4 would pass 12
    scheduler.submit([job([1, 2, 3, 4], config, []) for _ in range(3)])
    scheduler.step()
    assert len(scheduler.rows) == 5  # running: 2 x 4 positions a step
    scheduler.step()
    assert len(scheduler.rows) == 7


def test_calls_run_between_steps_in_order_and_fail_at_shutdown():
    scheduler = Scheduler(tiny(), Letters(), max_batch=1, max_queue=0)
    first = scheduler.call(lambda: "first")  # an idle server takes one even with no queue
    with pytest.raises(QueueFull):
        scheduler.call(lambda: "second")
    scheduler.step()
    assert first.result(0) == "first"
    broken = scheduler.call(lambda: 1 / 0)
    scheduler.step()
    with pytest.raises(ZeroDivisionError):  # the caller's to report, not the scheduler's
        broken.result(0)
    pending = scheduler.call(lambda: "never")
    scheduler.close()
    scheduler.run()  # returns at once: closed, and fails what was left
    with pytest.raises(QueueFull, match="shut down"):
        pending.result(0)
