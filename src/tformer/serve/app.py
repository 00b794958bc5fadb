"""The HTTP application: OpenAI's routes and tformer's own, on FastAPI.

    POST /v1/completions         text completion (serve/completions.py)
    POST /v1/chat/completions    chat, rendered with the checkpoint's chat template
    POST /v1/translations        tformer's: translate with an encoder-decoder checkpoint
    POST /v1/answers             tformer's: answer a question from a context or the corpus
    POST /v1/inspect             tformer's: attention, logit lens and residual norms on a
                                 text; a translation's alignment (serve/inspect.py)
    GET  /v1/models              the one model served
    GET  /v1/models/{model}      it, with tformer's details (serve/playground.py)
    GET  /                       the playground page, its files under /playground/
    GET  /health                 503 while loading, then 200
    GET  /metrics                Prometheus text (serve/metrics.py)

Before a route runs, in this order: with --api-key, a /v1 request without "Authorization:
Bearer KEY" (compared in constant time) is a 401; while loading or shutting down a 503; an
unknown route a 404; a body over the size limit a 413. Every error is OpenAI's
error object (serve/errors.py).
"""

import hmac
import sys
import traceback

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from tformer.models.load import LANGUAGE, QA, TRANSLATION
from tformer.serve import applications, completions, inspect, playground
from tformer.serve.errors import APIError
from tformer.serve.protocol import (
    AnswerRequest,
    ChatRequest,
    CompletionRequest,
    InspectRequest,
    TranslationRequest,
    parse_body,
)
from tformer.serve.service import Service, load_language_model

LOADERS = {
    LANGUAGE: load_language_model,
    TRANSLATION: applications.load_translation,
    QA: applications.load_reader_service,
}
ROUTES = {
    "/v1/completions": LANGUAGE,
    "/v1/chat/completions": LANGUAGE,
    "/v1/translations": TRANSLATION,
    "/v1/answers": QA,
    "/v1/inspect": LANGUAGE,
}
WHAT_RUNS = {
    LANGUAGE: "a language model: use /v1/completions or /v1/chat/completions",
    TRANSLATION: "a translation model: use /v1/translations",
    QA: "a question-answering reader: use /v1/answers",
}


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="tformer serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.middleware("http")
    async def guard(request: Request, call_next) -> Response:
        path = request.url.path
        try:
            if path.startswith("/v1/"):
                check_key(service, request)
                if service.draining:
                    raise APIError(503, "the server is shutting down", code="shutting_down")
                if not service.ready.is_set() and path in ROUTES:
                    raise APIError(503, "the model is still loading; retry shortly", code="loading")
            response = await call_next(request)
        except APIError as e:
            response = e.response()
        except Exception as error:  # a bug: one line in the response, the traceback logged
            traceback.print_exception(error, file=sys.stderr)
            message = f"internal error: {type(error).__name__}: {error}".splitlines()[0]
            response = APIError(500, message).response()
        if path in ROUTES or path == "/v1/models":
            service.metrics.answered(path, response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}"}.get(
            error.status_code, str(error.detail)
        )
        code = "not_found" if error.status_code == 404 else None
        return APIError(error.status_code, message, code=code).response()

    @app.post("/v1/completions")
    async def post_completions(request: Request):
        body = await read_body(service, request, LANGUAGE)
        req = parse_body(body, CompletionRequest)
        return await completions.completions(service, request, req)

    @app.post("/v1/chat/completions")
    async def post_chat(request: Request):
        body = await read_body(service, request, LANGUAGE)
        req = parse_body(body, ChatRequest)
        return await completions.chat_completions(service, request, req)

    @app.post("/v1/translations")
    async def post_translations(request: Request):
        body = await read_body(service, request, TRANSLATION)
        req = parse_body(body, TranslationRequest)
        completions.check_model(service, req.model)
        return await applications.translations(service, req)

    @app.post("/v1/answers")
    async def post_answers(request: Request):
        body = await read_body(service, request, QA)
        req = parse_body(body, AnswerRequest)
        completions.check_model(service, req.model)
        return await applications.answers(service, req)

    @app.post("/v1/inspect")
    async def post_inspect(request: Request):
        inspected = service.kind if service.kind in (LANGUAGE, TRANSLATION) else LANGUAGE
        body = await read_body(service, request, inspected)
        req = parse_body(body, InspectRequest)
        completions.check_model(service, req.model)
        return await inspect.inspect(service, req)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [playground.model_object(service)]}

    @app.get("/v1/models/{model:path}")  # a --model-name may hold a slash
    def model_details(model: str):  # reads metrics.jsonl: on a worker thread, not the loop
        completions.check_model(service, model)
        if not service.ready.is_set():
            raise APIError(503, "the model is still loading; retry shortly", code="loading")
        return playground.model_details(service)

    @app.get("/")
    async def page():
        return FileResponse(playground.PAGE_DIRECTORY / "index.html")

    app.mount("/playground", StaticFiles(directory=playground.PAGE_DIRECTORY), name="playground")

    @app.get("/health")
    async def health():
        if service.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not service.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def check_key(service: Service, request: Request) -> None:
    key = service.config.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(
            401,
            "missing API key: send it as the header 'Authorization: Bearer KEY'",
            code="invalid_api_key",
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


async def read_body(service: Service, request: Request, kind: str) -> bytes:
    """The request's body, refused if this server runs another kind of model (404) or the
    body is over the size limit (413)."""
    if service.kind != kind:
        raise APIError(
            404,
            f"{request.url.path} is not served here: this server runs {WHAT_RUNS[service.kind]}",
            code="not_found",
        )
    limit = service.config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large(len(body), limit)
    return bytes(body)


def too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is {size:,} bytes or more; this server takes at most {limit:,}",
        code="request_too_large",
    )
