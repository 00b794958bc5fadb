"""The playground: a page at / that generates, chats, translates and answers through the
server's own endpoints and shows the model's inside (/v1/inspect), and what it reads about
the model, GET /v1/models/{model}.

The page is plain HTML, CSS and JavaScript in serve/playground/ (no build step, nothing
fetched from elsewhere), served as files under /playground/. It asks for the API key
when the server wants one (a 401), and keeps it for the browser tab's session.

    GET /v1/models/{model}   OpenAI's model object, and tformer's details: the kind, the
                             configuration, the parameter count, the tokenizer, the
                             decoding path, where the chat template came from, and the
                             training curve of the run directory it was saved in
                             (metrics.jsonl), if any
"""

import dataclasses
import math
from pathlib import Path

from tformer.serve.service import Service
from tformer.train.metrics import METRICS_FILE, parse_metrics

PAGE_DIRECTORY = Path(__file__).with_name("playground")
CURVE_POINTS = 400  # a training curve is thinned to about this many points a series


def model_object(service: Service) -> dict:
    """The served model as GET /v1/models lists it."""
    return {
        "id": service.model_id,
        "object": "model",
        "created": service.created,
        "owned_by": "tformer",
        "kind": service.kind,
        "context_length": service.context_length or None,
    }


def model_details(service: Service) -> dict:
    config = getattr(service.model, "config", None)
    tokenizer = service.tokenizer
    return {
        **model_object(service),
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
        "parameters": service.parameters,
        "tokenizer": {
            "type": type(tokenizer).__name__,
            "vocab_size": getattr(tokenizer, "vocab_size", None),
        },
        "decoding": service.decoding,
        # where the template came from: "checkpoint", "default", or "file" (not its path)
        "chat_template": service.chat.source.split(" ")[0] if service.chat is not None else None,
        "training": training_curve(service.directory),
    }


def training_curve(directory: Path) -> dict | None:
    """{"train": [[step, loss], ...], "validation": [[step, val_loss], ...]} from the run's
    metrics.jsonl, or None where the checkpoint is not a run directory."""
    path = Path(directory) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        records, _ = parse_metrics(path)
    except (OSError, ValueError):
        return None
    train = [[r["step"], r["loss"]] for r in records if r["type"] == "train" and "loss" in r]
    validation = [
        [r["step"], r["val_loss"]] for r in records if r["type"] == "eval" and "val_loss" in r
    ]
    return {"train": thin(train), "validation": thin(validation)}


def thin(points: list[list[float]]) -> list[list[float]]:
    """Every k-th point, and the last, so that about CURVE_POINTS remain."""
    step = max(1, math.ceil(len(points) / CURVE_POINTS))
    kept = points[::step]
    if points and kept[-1] is not points[-1]:
        kept.append(points[-1])
    return kept
