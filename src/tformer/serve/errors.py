"""Errors as OpenAI's API gives them: a status and one JSON object that says what to fix.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature",
               "code": null}}

400 a field is missing, of the wrong type or out of range (param names it), or the prompt
does not fit the context window (the message gives both lengths); 401 a missing or wrong
API key; 404 an unknown model or route; 413 a body over the size limit; 429 the queue is
full (with Retry-After); 503 loading or shutting down. A request never gets a 500 for its
input: whatever the server did not foresee is a 500 with a one-line message, no traceback.
"""

from fastapi.responses import JSONResponse

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = TYPES.get(self.status, "invalid_request_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


RETRY_AFTER_SECONDS = 1


def busy(why: str) -> APIError:
    """429: the queue is full; the client may try again in a second."""
    return APIError(
        429,
        f"the server is busy ({why}); retry after {RETRY_AFTER_SECONDS} s",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)
