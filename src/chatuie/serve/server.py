"""An OpenAI-compatible HTTP server around a ChatUIE model, with grounded extraction.

Endpoints (JSON; errors as OpenAI does: ``{"error": {"message", "type", "code"}}`` with a 4xx
status, so the ``openai`` client raises its usual exceptions):

* ``GET /v1/models`` the one model served.
* ``POST /v1/chat/completions`` non-streaming chat completions (without a system message, the
  ChatUIE system prompt the model was taught with is put first). A user turn that is exactly an
  IE instruction of this project (:func:`chatuie.data.prompts.ie_user_prompt`) is answered with the
  generation constraint (valid JSON, grounded spans); anything else is generated freely.
* ``POST /v1/extract`` ``{"text": ..., "schema": {...}}`` (schema as in ``docs/schema.md``) ->
  entities / relations / events with character offsets (:mod:`chatuie.serve.extractor`).
* ``GET /health`` liveness (no key needed).

One thread owns the model, and concurrent ``/v1/extract`` requests are decoded together
(:mod:`chatuie.serve.worker`). Requests are read and checked by :mod:`chatuie.serve.request_parsing`;
the settings are :class:`chatuie.serve.settings.ServerSettings`.

With an API key (``--api-key`` or ``CHATUIE_API_KEY``) every ``/v1`` call needs
``Authorization: Bearer <key>``; the server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

# Module level, not inside create_app: FastAPI resolves the (string) annotations of the
# endpoints against this module's globals to recognise the Request parameter.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatuie.errors import ExtractError
from chatuie.serve.extractor import Extractor
from chatuie.serve.request_parsing import ApiError, parse_chat, parse_extract, parse_ie_prompt, read_json
from chatuie.serve.settings import ServerSettings
from chatuie.serve.worker import ModelWorker

log = logging.getLogger(__name__)


def _error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------------
# chat completions


def _generate_chat(extractor: Extractor, request: dict[str, Any]) -> dict[str, Any]:
    """Runs on the model thread."""
    import torch

    model, tokenizer = extractor.model, extractor.tokenizer
    prompt = tokenizer.apply_chat_template(request["messages"], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    room = extractor.context_tokens - len(prompt_ids)
    if room < 1:
        raise ApiError(
            400,
            f"messages: the prompt has {len(prompt_ids)} tokens, the model's context "
            f"is {extractor.context_tokens}",
            "context_length_exceeded",
        )
    max_tokens = min(request["max_tokens"], room)
    ie = (
        parse_ie_prompt(request["messages"][-1]["content"], extractor.chat)
        if request["messages"][-1]["role"] == "user"
        else None
    )
    if ie is not None:
        from chatuie.decoding import IERequest, constrained_generate

        task, text, schema = ie
        content = constrained_generate(
            model,
            tokenizer,
            [prompt],
            [IERequest(task, text, schema)],
            max_new_tokens=max_tokens,
            batch_size=1,
            repetition_penalty=extractor.settings.repetition_penalty,
        )[0]
        completion_tokens = len(tokenizer(content, add_special_tokens=False)["input_ids"])
        finish = "stop"
    else:
        sample = request["temperature"] > 0
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": sample}
        if sample:
            kwargs.update(temperature=request["temperature"], top_p=request["top_p"], top_k=0)
        kwargs["pad_token_id"] = tokenizer.pad_token_id
        ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        new = out[0, ids.shape[1] :].tolist()
        stops = set(model.generation_config.eos_token_id or [])
        ended = bool(new) and new[-1] in stops
        content = tokenizer.decode(new, skip_special_tokens=True)
        completion_tokens = len(new)
        finish = "stop" if ended or len(new) < max_tokens else "length"
    return {
        "content": content,
        "finish_reason": finish,
        "usage": {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": completion_tokens,
            "total_tokens": len(prompt_ids) + completion_tokens,
        },
        "constrained": ie is not None,
    }


# ----------------------------------------------------------------------------------------------
# the app


async def _await(future: Future) -> Any:
    try:
        return await asyncio.wrap_future(future)
    except ApiError:
        raise
    except ExtractError as err:
        raise ApiError(400, str(err)) from None
    except Exception:
        # The details are for the server's log, not for clients (they may show paths and internals).
        ref = uuid.uuid4().hex[:12]
        log.exception("model call failed (ref %s)", ref)
        raise ApiError(500, f"internal error (ref {ref}; details in the server log)") from None


def create_app(extractor: Extractor, settings: ServerSettings | None = None) -> Any:
    """The FastAPI app; ``app.state.worker`` holds the model thread (and its batch stats)."""
    settings = settings or ServerSettings(model_name=extractor.name)
    worker = ModelWorker(extractor, settings)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="chatuie", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.settings = settings
    app.state.counts = {"requests": 0, "chat_completions": 0, "extract": 0, "errors": 0}

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
        app.state.counts["errors"] += 1
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        body = _error_body(err.status, err.message, err.code, err.param)
        return JSONResponse(body, err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        app.state.counts["errors"] += 1
        return JSONResponse(_error_body(err.status_code, str(err.detail)), err.status_code)

    def check_key(request: Request) -> None:
        app.state.counts["requests"] += 1
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise ApiError(
                401, "invalid or missing API key (send Authorization: Bearer <key>)", "invalid_api_key"
            )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        entry = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "chatuie"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> dict[str, Any]:
        check_key(request)
        app.state.counts["chat_completions"] += 1
        parsed = parse_chat(await read_json(request, settings.max_request_bytes), settings, extractor.chat)
        result = await _await(worker.submit(lambda: _generate_chat(extractor, parsed)))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": settings.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result["content"]},
                    "logprobs": None,
                    "finish_reason": result["finish_reason"],
                }
            ],
            "usage": result["usage"],
        }

    @app.post("/v1/extract")
    async def extract(request: Request) -> dict[str, Any]:
        check_key(request)
        app.state.counts["extract"] += 1
        worker.in_flight += 1
        try:
            text, schema = parse_extract(await read_json(request, settings.max_request_bytes), settings)
            started = time.monotonic()
            result = await _await(worker.submit_extract(text, schema))
        finally:
            worker.in_flight -= 1
        return {
            "id": f"extract-{uuid.uuid4().hex}",
            "object": "extraction",
            "model": settings.model_name,
            **result,
            "seconds": round(time.monotonic() - started, 4),
        }

    return app


# ----------------------------------------------------------------------------------------------
# running it


class BackgroundServer:
    """Serve an app from a thread on a free (or given) port: ``with BackgroundServer(app) as url``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> str:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="chatuie-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        self.url = f"http://{self.host}:{port}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(extractor: Extractor, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use the model", host)
    uvicorn.run(create_app(extractor, settings), host=host, port=port, log_level="info")
