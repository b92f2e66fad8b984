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

One thread owns the model (``generate`` is not re-entrant, and the tokenizer is mutated while
decoding). Concurrent ``/v1/extract`` requests are collected for up to ``batch_window_ms`` (up to
``max_batch_size`` requests) and decoded together in one ``constrained_generate`` call; the
window is only waited while other extraction requests are in flight, so a lone client pays no
extra latency, and requests that arrive while a batch decodes form the next batch.

With an API key (``--api-key`` or ``CHATUIE_API_KEY``) every ``/v1`` call needs
``Authorization: Bearer <key>``; the server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

# Module level, not inside create_app: FastAPI resolves the (string) annotations of the
# endpoints against this module's globals to recognise the Request parameter.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatuie.data.prompts import DEFAULT_OPTIONS, SYSTEM_PROMPT, TEXT_LINE, ChatOptions, ie_user_prompt
from chatuie.data.records import Schema
from chatuie.data.schema import ExtractionSchema, SchemaError
from chatuie.data.text import text_problem
from chatuie.errors import ExtractError, printable
from chatuie.serve.extractor import Extractor

log = logging.getLogger(__name__)

API_KEY_ENV = "CHATUIE_API_KEY"
_TASKS = {"named entity recognition": "ner", "relation extraction": "re", "event extraction": "ee"}
_ROLES = {"system", "user", "assistant", "developer"}
_EXTRACT_KEYS = {"text", "schema"}


@dataclass
class ServerSettings:
    model_name: str = "chatuie"
    api_key: str | None = None
    batching: bool = True
    batch_window_ms: float = 15.0  # how long the first request of a batch waits for company
    max_batch_size: int = 8  # /v1/extract requests decoded together
    max_batch_rows: int = 64  # prompt rows (requests x windows x instructions) per generate batch
    max_request_bytes: int = 1 << 20
    max_text_chars: int = 20_000
    max_chat_tokens: int = 512  # cap on max_tokens of a chat completion


class ApiError(Exception):
    """An answer with a 4xx/5xx status; ``param`` names the request field at fault (as OpenAI)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        message = printable(message)  # quoted input may hold an unpaired surrogate: never sendable
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def _error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _check_text(value: str, where: str) -> str:
    """400 naming ``where`` for text no tokenizer can encode (an unpaired surrogate)."""
    problem = text_problem(value)
    if problem is not None:
        raise ApiError(400, f"{where}: {problem}", "invalid_text", where)
    return value


# ----------------------------------------------------------------------------------------------
# the model thread


@dataclass
class _ExtractJob:
    text: str
    schema: ExtractionSchema
    future: Future = field(default_factory=Future)


@dataclass
class _CallJob:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


_STOP = object()


class ModelWorker:
    """The one thread that touches the model; batches extraction requests."""

    def __init__(self, extractor: Extractor, settings: ServerSettings) -> None:
        self.extractor = extractor
        self.settings = settings
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stats: dict[str, Any] = {
            "batches": 0,
            "extract_requests": 0,
            "largest_batch": 0,
            "calls": 0,
            "extract_cpu_s": 0.0,
            "extract_busy_s": 0.0,
        }
        # /v1/extract requests between arrival and answer; only the event loop changes it, the
        # model thread reads it (a plain int: atomic under the GIL).
        self.in_flight = 0

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="chatuie-model", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)

    def submit_extract(self, text: str, schema: ExtractionSchema) -> Future:
        self.start()
        job = _ExtractJob(text, schema)
        self._queue.put(job)
        return job.future

    def submit(self, fn: Callable[[], Any]) -> Future:
        self.start()
        job = _CallJob(fn)
        self._queue.put(job)
        return job.future

    # -- loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        later: list[Any] = []  # jobs that arrived while a batch was being gathered
        while True:
            job = later.pop(0) if later else self._queue.get()
            if job is _STOP:
                return
            if isinstance(job, _CallJob):
                self._run_call(job)
                continue
            batch = [job]
            if self.settings.batching:
                deadline = time.monotonic() + self.settings.batch_window_ms / 1000
                while len(batch) < self.settings.max_batch_size:
                    left = deadline - time.monotonic()
                    # Wait only while more extraction requests are in flight (arrived, body being
                    # read or queued) than collected: a lone client pays no window.
                    waiting = left > 0 and self.in_flight > len(batch)
                    try:
                        nxt = (
                            self._queue.get(timeout=min(left, 0.002)) if waiting else self._queue.get_nowait()
                        )
                    except queue.Empty:
                        if waiting:
                            continue
                        break
                    if isinstance(nxt, _ExtractJob):
                        batch.append(nxt)
                    else:
                        later.append(nxt)
            self._run_batch(batch)

    def _run_call(self, job: _CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        self.stats["calls"] += 1
        try:
            job.future.set_result(job.fn())
        except BaseException as err:  # noqa: BLE001 - handed to the waiting request, never fatal
            job.future.set_exception(err)

    def _run_batch(self, batch: list[_ExtractJob]) -> None:
        ready = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:  # per request: a schema too large for the context fails that request alone
                self.extractor.window_tokens(job.schema)
            except Exception as err:  # noqa: BLE001
                job.future.set_exception(err)
                continue
            ready.append(job)
        if not ready:
            return
        self.stats["batches"] += 1
        self.stats["extract_requests"] += len(ready)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(ready))
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            results = self.extractor.extract_many(
                [(job.text, job.schema) for job in ready], batch_size=self.settings.max_batch_rows
            )
        except Exception as err:  # noqa: BLE001
            if len(ready) == 1:
                ready[0].future.set_exception(err)
                return
            log.warning("batch of %d failed (%s): retrying one by one", len(ready), err)
            for job in ready:
                try:
                    job.future.set_result(
                        self.extractor.extract_many(
                            [(job.text, job.schema)], batch_size=self.settings.max_batch_rows
                        )[0]
                    )
                except Exception as one_err:  # noqa: BLE001
                    job.future.set_exception(one_err)
            return
        # What the model thread spent (its CPU time covers torch's work with one intra-op thread).
        self.stats["extract_cpu_s"] += time.thread_time() - cpu
        self.stats["extract_busy_s"] += time.perf_counter() - wall
        for job, result in zip(ready, results, strict=True):
            job.future.set_result(result)


# ----------------------------------------------------------------------------------------------
# chat completions


def parse_ie_prompt(content: str, chat: ChatOptions = DEFAULT_OPTIONS) -> tuple[str, str, Schema] | None:
    """``(task, text, schema)`` if ``content`` is exactly an IE instruction of this project."""
    lines = content.split("\n")
    if not lines or not lines[0].startswith("Task: ") or not lines[0].endswith("."):
        return None
    task = _TASKS.get(lines[0][len("Task: ") : -1])
    if task is None:
        return None
    text_at = next((i for i, line in enumerate(lines) if line.startswith(TEXT_LINE)), None)
    if text_at is None:
        return None
    text = "\n".join(lines[text_at:])[len(TEXT_LINE) :]
    headers = {}
    for line in lines[1:text_at]:
        name, sep, value = line.partition(": ")
        if sep:
            headers[name] = value
    try:
        if task == "ee":
            # Without the role lists in the prompt the roles are unknown: answer freely.
            schema = Schema(events=json.loads(headers["Event types and roles"]))
        else:
            relations = json.loads(headers["Relation types"]) if task == "re" else []
            schema = Schema(entities=json.loads(headers["Entity types"]), relations=relations)
        if ie_user_prompt(task, text, schema, chat) != content:  # re-render: exactly our format or nothing
            return None
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    return task, text, schema


def _message_text(message: Any, index: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise ApiError(400, f"messages[{index}]: expected an object with role and content")
    role = message.get("role")
    if role not in _ROLES:
        raise ApiError(400, f"messages[{index}].role: {role!r} is not one of {sorted(_ROLES)}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is understood
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ApiError(400, f"messages[{index}].content[{j}]: only text parts are supported")
            texts.append(_check_text(part["text"], f"messages[{index}].content[{j}].text"))
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{index}].content: expected a string")
    _check_text(content, f"messages[{index}].content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, *, integer: bool) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        raise ApiError(400, f"{key}: expected {'an integer' if integer else 'a number'}")
    if not lo <= value <= hi:
        raise ApiError(400, f"{key}: must be between {lo} and {hi}")
    return value


def _parse_chat(body: Any, settings: ServerSettings, chat: ChatOptions = DEFAULT_OPTIONS) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "request body: expected a JSON object")
    if body.get("stream"):
        raise ApiError(400, "stream: streaming is not supported by this server", "unsupported")
    model = body.get("model")
    if model is None:
        raise ApiError(
            400, f"model: missing (this server serves {settings.model_name!r})", "missing_model", "model"
        )
    if not isinstance(model, str):
        raise ApiError(400, f"model: expected a string, got {type(model).__name__}", param="model")
    if model != settings.model_name:
        raise ApiError(
            404,
            f"model {model!r} not found (this server serves {settings.model_name!r})",
            "model_not_found",
            "model",
        )
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages: expected a non-empty list")
    messages = [_message_text(m, i) for i, m in enumerate(raw)]
    if messages[0]["role"] != "system" and chat.system_prompt:  # taught under its own system prompt
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    if messages[-1]["role"] == "assistant":
        raise ApiError(400, "messages: the last message must not be the assistant's")
    n = _number(body, "n", 1, 1, 1, integer=True)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number(
        {"max_tokens": limit}, "max_tokens", settings.max_chat_tokens, 1, 1 << 20, integer=True
    )
    return {
        "messages": messages,
        "n": n,
        "max_tokens": min(max_tokens, settings.max_chat_tokens),
        "temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0, integer=False)),
        "top_p": float(_number(body, "top_p", 1.0, 0.0, 1.0, integer=False)),
    }


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


async def _read_json(request: Any, limit: int) -> Any:
    """The request body as JSON, refusing bodies over ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
        if size > limit:
            raise ApiError(
                413, f"request body of {size} bytes exceeds the limit of {limit} bytes", "request_too_large"
            )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
    if not body:
        raise ApiError(400, "request body is empty: expected JSON")
    try:
        return json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, f"malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None


def _parse_extract(body: Any, settings: ServerSettings) -> tuple[str, ExtractionSchema]:
    if not isinstance(body, dict):
        raise ApiError(400, "request body: expected a JSON object with 'text' and 'schema'")
    unknown = sorted(set(body) - _EXTRACT_KEYS)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} (known: schema, text)")
    text = body.get("text")
    if not isinstance(text, str):
        raise ApiError(400, "text: expected a string" if "text" in body else "text: missing")
    _check_text(text, "text")
    if not text.strip():
        raise ApiError(400, "text: empty")
    if len(text) > settings.max_text_chars:
        raise ApiError(
            413,
            f"text: {len(text)} characters exceed the limit of {settings.max_text_chars}",
            "text_too_long",
        )
    if "schema" not in body:
        raise ApiError(400, "schema: missing")
    try:
        schema = ExtractionSchema.from_dict(body["schema"], "schema")
    except SchemaError as err:
        raise ApiError(400, str(err), "invalid_schema") from None
    return text, schema


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
        parsed = _parse_chat(await _read_json(request, settings.max_request_bytes), settings, extractor.chat)
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
            text, schema = _parse_extract(await _read_json(request, settings.max_request_bytes), settings)
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
