"""What one server serves: a checkpoint, loaded in the background, and what runs it.

A language model is run by the continuous-batching Scheduler on its own thread; a
translation model or a question-answering reader by one worker thread, a request at a
time. Either way the model is touched by one thread only. `ready` turns true once the
model is loaded (GET /health answers 503 until then); `draining` once a shutdown began
(new requests get 503).
"""

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tformer.checkpoints import resolve_checkpoint
from tformer.checkpoints.gguf import is_gguf
from tformer.generate.chat import ChatTemplate, load_chat_template
from tformer.generate.fast import load_for_decoding
from tformer.models.load import checkpoint_kind
from tformer.nn.packed_linear import ANY, calibrate_kernel_rows
from tformer.serve.metrics import Metrics
from tformer.serve.scheduler import Scheduler


@dataclass
class ServeConfig:
    checkpoint: str
    model_id: str | None = None  # the name clients send as "model"; default: the directory's
    max_batch: int = 16
    max_queue: int = 256
    dtype: str = "float32"
    quantize: str | None = None  # "int8" or "int4" (weight-only), "w8a8" or "w4a8"
    device: torch.device | None = None
    chat_template: str | None = None  # a Jinja file that overrides the checkpoint's
    corpus: str | None = None  # /v1/answers: the text retrieved from when no context is given
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    grace_seconds: float = 30.0


class Service:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.directory = resolve_checkpoint(config.checkpoint)
        self.kind = checkpoint_kind(self.directory)  # checked before the server starts
        self.model_id = config.model_id or Path(self.directory).name
        self.created = int(time.time())
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.draining = False
        self.load_error: str | None = None
        self.model = None
        self.tokenizer = None
        self.chat: ChatTemplate | None = None
        self.context_length = 0
        self.decoding = ""  # which path the model runs on (DecodingPath.describe)
        self.parameters: int | None = None  # the model's, counted before packing
        self.scheduler: Scheduler | None = None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="tformer-model")
        self.index = None  # /v1/answers: the corpus's BM25 index
        self.worker_waiting = 0  # requests queued for the worker thread (or on it)

    def load(self, loaders: dict[str, Callable[["Service", torch.device], None]]) -> None:
        """Load the model with the loader for its kind and start what runs it; on failure
        `load_error` says why."""
        try:
            loaders[self.kind](self, self.config.device or torch.device("cpu"))
            self.ready.set()
        except Exception as error:  # reported by the CLI, which then exits
            self.load_error = f"{self.config.checkpoint}: {error}"

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        self.worker.shutdown(wait=False, cancel_futures=True)


def load_language_model(service: Service, device: torch.device) -> None:
    """A GPT-2 checkpoint packed for decoding, its chat template, and the scheduler's
    thread."""
    config = service.config
    service.chat = load_chat_template(service.directory, config.chat_template)
    model, tokenizer, path = load_for_decoding(
        str(service.directory), device, config.dtype, config.quantize
    )
    template = tokenizer.chat_template
    if is_gguf(service.directory) and config.chat_template is None and isinstance(template, str):
        # a GGUF file carries its template in its metadata, not in a file beside it
        where = f"tokenizer.chat_template of {service.directory}"
        service.chat = ChatTemplate(template, "checkpoint", where)
    path = replace(path, fused=False)  # the scheduler's slot caches take the modules' path
    service.decoding, service.parameters = path.describe(), path.parameters
    print(f"tformer serve: decoding: {service.decoding}", file=sys.stderr)
    if path.kernels is not None:  # where torch's matmul overtakes them, on this CPU
        # the head is timed at a prompt's rows too: prompt log-probabilities unembed them
        rows = calibrate_kernel_rows(model, config.max_batch, cached=True)
        shown = ", ".join(f"{shape}: {n if n < ANY else 'any'}" for shape, n in rows.items())
        print(f"tformer serve: C kernels up to rows: {shown}", file=sys.stderr)
    service.model, service.tokenizer = model, tokenizer
    service.context_length = model.config.max_len
    service.scheduler = Scheduler(
        model, tokenizer, config.max_batch, config.max_queue, service.metrics
    )
    cache_bytes = sum(c.k.nbytes + c.v.nbytes for c in service.scheduler.caches)
    print(
        f"tformer serve: KV cache: {config.max_batch} slots of {model.config.max_len} "
        f"positions, {cache_bytes / 2**30:.2f} GiB",
        file=sys.stderr,
    )
    thread = threading.Thread(target=service.scheduler.run, name="tformer-scheduler", daemon=True)
    thread.start()
