"""`tformer serve`: serve a checkpoint over OpenAI's HTTP API (and tformer's own routes)."""

import ipaddress
import os
import sys
import threading
from pathlib import Path

import torch

from tformer.cli.common import add_weight_flags, non_empty, number
from tformer.devices import pick_device


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over OpenAI's HTTP API",
        description="Serve a checkpoint over HTTP. A language model answers OpenAI's "
        "POST /v1/completions and /v1/chat/completions (streamed or not; the chat template "
        "is the checkpoint's, --chat-template's, or a plain transcript), decoding up to "
        "--max-batch requests at once with continuous batching; a translation model "
        "answers POST /v1/translations, a question-answering reader POST /v1/answers. "
        "POST /v1/inspect shows inside a language model (attention, logit lens, residual "
        "norms) or a translation's alignment. GET / is a playground page for all of it in a "
        "browser. GET /v1/models, /health (503 while loading) and /metrics (Prometheus) "
        "always. "
        "SIGTERM stops taking requests, lets the running ones finish for --grace-period "
        "seconds, and exits 0.",
    )
    p.add_argument("checkpoint", help="a run or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument(
        "--port", type=number(integer=True, low=0, high=65535), default=8000, help="(default: 8000)"
    )
    p.add_argument(
        "--max-batch",
        type=number(integer=True, low=1, high=1024),
        default=16,
        help="requests decoded at once: KV-cache slots, each a whole context window of keys "
        "and values (GPT-2 124M: 72 MiB a slot in float32) (default: 16)",
    )
    p.add_argument(
        "--max-queue",
        type=number(integer=True, low=0),
        default=256,
        help="requests waiting for a slot; more get 429 with Retry-After (default: 256)",
    )
    add_weight_flags(p)
    p.add_argument(
        "--api-key",
        type=non_empty,
        default=os.environ.get("TFORMER_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $TFORMER_API_KEY)",
    )
    p.add_argument(
        "--model-name", type=non_empty, help="the model's id (default: the directory's name)"
    )
    p.add_argument(
        "--chat-template", help="a Jinja chat template file, instead of the checkpoint's"
    )
    p.add_argument("--corpus", help="/v1/answers: retrieve from this text when no context is given")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument(
        "--threads", type=number(integer=True, low=1), help="CPU threads (default: torch's choice)"
    )
    p.add_argument(
        "--grace-period",
        type=number(low=0),
        default=30.0,
        help="seconds running requests get to finish after SIGTERM (default: 30)",
    )
    p.add_argument(
        "--max-body-mb",
        type=number(low=0, low_open=True),
        default=4.0,
        help="largest request body, MiB; more gets 413 (default: 4)",
    )
    p.set_defaults(run=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> None:
    # The serving stack (uvicorn, FastAPI) is imported here, not with the program: every
    # other command would load it for nothing (0.2 s, docs/LOG.md).
    import uvicorn

    from tformer.serve.app import LOADERS, create_app
    from tformer.serve.server import Server
    from tformer.serve.service import ServeConfig, Service

    if args.chat_template is not None and not Path(args.chat_template).is_file():
        raise FileNotFoundError(f"--chat-template: {args.chat_template}: no such file")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = ServeConfig(
        checkpoint=args.checkpoint,
        model_id=args.model_name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        dtype=args.dtype,
        quantize=None if args.quantize == "none" else args.quantize,
        device=pick_device(args.device),
        chat_template=args.chat_template,
        corpus=args.corpus,
        api_key=args.api_key,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        grace_seconds=args.grace_period,
    )
    service = Service(config)  # the checkpoint's kind is read now: a bad path fails here
    if not is_loopback(args.host) and args.api_key is None:
        print(
            f"tformer serve: warning: listening on {args.host} without --api-key: anyone who "
            "can reach this address can use the model",
            file=sys.stderr,
        )
    server = Server(
        uvicorn.Config(
            create_app(service),
            host=args.host,
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=args.grace_period,
            lifespan="off",
        ),
        service,
    )

    def load() -> None:
        service.load(LOADERS)
        if service.load_error is not None:
            server.should_exit = True
        else:
            print(
                f"tformer serve: {service.model_id} ({service.kind}) ready on "
                f"http://{args.host}:{args.port}; the playground: open "
                f"http://{args.host}:{args.port}/ in a browser",
                file=sys.stderr,
                flush=True,
            )

    threading.Thread(target=load, name="tformer-load", daemon=True).start()
    try:
        server.run()
    finally:
        service.close()
    if service.load_error is not None:
        raise ValueError(service.load_error)
