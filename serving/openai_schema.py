"""What the OpenAI-compatible CPU server accepts and answers, declared where clients read it (``/openapi.json``).

The request is the subset of OpenAI's (and SGLang's) chat request this server honours; unknown fields are ignored.
Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}`` (its ``ErrorResponse``), and
``/openapi.json`` lists every status a route answers (FastAPI's own 422 is not one: a request that fails validation
gets a 400 here, as from OpenAI). The replies themselves are checked against OpenAI's published schemas by
tests/test_serving_batch.py (``test_replies_validate_against_openais_published_schemas``)."""
from __future__ import annotations

import json
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_BODY_BYTES = 8 << 20  # a request body over this gets a 413 (a chat of the longest context is far smaller)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(strict=True)
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, strict=True)
    max_completion_tokens: Optional[int] = Field(None, ge=1, strict=True)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, strict=True)
    stream: bool = Field(False, strict=True)
    stream_options: Optional[dict] = None
    seed: Optional[int] = Field(None, strict=True)
    stop: Union[str, list[str], None] = None
    separate_reasoning: bool = Field(True, strict=True)
    ignore_eos: bool = Field(False, strict=True)  # SGLang's extra sampling parameter: generate to max_tokens


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status)


_WHY = {
    400: "a malformed request: invalid JSON, a field out of range, a prompt or max_tokens past the context or the "
         "server's limit",
    401: "a missing or wrong API key (Authorization: Bearer KEY), when the server was started with --api-key",
    404: "a model id other than the one this server serves",
    413: f"a request body over {MAX_BODY_BYTES >> 20} MiB",
    500: "the generation failed (only the requests in that decoding step; the server keeps serving)",
    503: "the server is busy: --max-queue requests are waiting or running",
}


def errors(*statuses: int) -> dict:
    """The ``responses`` of a route: these statuses, each with OpenAI's error body."""
    return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in statuses}


def without_422(app) -> None:
    """Drop the 422 FastAPI declares for every route with a body (this server answers 400 instead)."""
    make = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = make()
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = openapi


class APIKey:
    """ASGI middleware: ``/v1/*`` needs ``Authorization: Bearer KEY`` (else a 401). Plain ASGI, not Starlette's
    ``BaseHTTPMiddleware``: that one passes every streamed chunk through a stream and a task switch of its own
    (benchmarks/serve_load.py, 8 streamed chats on 2 cores: 908 tok/s with it, 1,136 without)."""

    def __init__(self, app, key: str):
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and \
                dict(scope["headers"]).get(b"authorization") != self.want:
            err = APIError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error",
                           code="invalid_api_key")
            return await _send_json(send, err.status, err.body())
        return await self.app(scope, receive, send)


async def _send_json(send, status: int, obj) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 before any of it is parsed (by its
    Content-Length, or counted as it arrives when it is sent chunked)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if int(length) > self.limit:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        parts, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            parts.append(msg.get("body", b""))
            size, more = size + len(parts[-1]), msg.get("more_body", False)
            if size > self.limit:
                return await self._refuse(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(parts), "more_body": False}
        return await self.app(scope, replay, send)

    async def _refuse(self, send):
        await _send_json(send, 413, APIError(413, f"request body over {self.limit} bytes",
                                             code="request_too_large").body())
