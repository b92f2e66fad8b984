"""A fake OpenAI chat-completions server for the judge tests (stdlib only, 127.0.0.1, port 0).

It speaks just enough of the protocol for the real ``openai`` client: ``POST
/v1/chat/completions`` and ``GET /v1/models``. By default it answers a deterministic
``{"score": s, "reason": "..."}`` where ``s = expected_score(prompt)`` (a hash of the prompt).

Faults are queued for the next N requests, in arrival order, either from Python
(:meth:`JudgeServer.fail_next`) or over HTTP (``POST /control``, for a subprocess)::

    429      rate limited, with ``Retry-After`` (seconds, ``retry_after``)
    500      internal error
    400      bad request (non-retryable)
    401      unauthorized, echoing the bearer token in the message (as some servers do)
    slow     sleep ``slow_s`` then answer normally (the client has timed out by then)
    garbage  a valid completion whose message content is not JSON
    badbody  HTTP 200 whose body is not JSON at all
    truncated  a Content-Length longer than the body, then the connection is closed

Every request is counted; ``answered`` counts, per sha256 of the prompt, the requests that got
a proper score answer (the ones a client could have cached).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "400", "401", "slow", "garbage", "badbody", "truncated")


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def expected_score(prompt: str) -> int:
    """The score the server gives ``prompt`` when no fault is queued."""
    return int(prompt_hash(prompt)[:8], 16) % 11


class JudgeServer:
    """Start with :meth:`start` (or use as a context manager); ``url`` is the ``/v1`` base URL."""

    def __init__(self, *, delay_s: float = 0.0, fence: bool = False) -> None:
        self.delay_s = delay_s  # applied to every request: keeps a run "mid-flight" for kill tests
        self.slow_s = 2.0
        self.fence = fence  # wrap the JSON answer in a ```json fence with chatter around it
        self.lock = threading.Lock()
        self.requests_total = 0
        self.completion_requests = 0
        self.models_requests = 0
        self.answered: Counter[str] = Counter()
        self.auth_headers: list[str] = []
        self.prompts: list[str] = []
        self.faults_served: Counter[str] = Counter()
        self._faults: deque[tuple[str, dict[str, Any]]] = deque()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control --------------------------------------------------------------------------
    def fail_next(self, mode: str, n: int = 1, **params: Any) -> None:
        if mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}; expected one of {FAULTS}")
        with self.lock:
            self._faults.extend((mode, dict(params)) for _ in range(n))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests_total": self.requests_total,
                "completion_requests": self.completion_requests,
                "answered": dict(self.answered),
                "faults_pending": len(self._faults),
                "faults_served": dict(self.faults_served),
            }

    def _next_fault(self) -> tuple[str, dict[str, Any]] | None:
        with self.lock:
            return self._faults.popleft() if self._faults else None

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> JudgeServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True  # a handler asleep in "slow" must not block shutdown
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server_owner: JudgeServer
    protocol_version = "HTTP/1.1"  # keep-alive, like a real endpoint behind the httpx pool
    disable_nagle_algorithm = True  # headers and body go out in two writes: avoid 40 ms stalls

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep test output clean

    # -- helpers --------------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout or killed): fine

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), headers)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # -- routes ---------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        owner = self.server_owner
        with owner.lock:
            owner.requests_total += 1
        if self.path.rstrip("/") == "/v1/models":
            with owner.lock:
                owner.models_requests += 1
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [{"id": "judge-test", "object": "model", "created": 0, "owned_by": "tests"}],
                },
            )
        elif self.path.rstrip("/") == "/control":
            self._send_json(200, owner.stats())
        else:
            self._send_json(404, {"error": {"message": "not found", "type": "not_found"}})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        owner = self.server_owner
        raw = self._read_body()
        if self.path.rstrip("/") == "/control":
            spec = json.loads(raw or b"{}")
            if "delay_s" in spec:
                owner.delay_s = float(spec["delay_s"])
            if spec.get("mode"):
                params = {k: v for k, v in spec.items() if k not in ("mode", "n", "delay_s")}
                owner.fail_next(spec["mode"], int(spec.get("n", 1)), **params)
            self._send_json(200, owner.stats())
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(404, {"error": {"message": "not found", "type": "not_found"}})
            return
        try:
            request = json.loads(raw)
            prompt = request["messages"][-1]["content"]
            model = request.get("model", "judge-test")
        except (ValueError, KeyError, IndexError, TypeError):
            self._send_json(400, {"error": {"message": "bad request body", "type": "invalid"}})
            return
        with owner.lock:
            owner.requests_total += 1
            owner.completion_requests += 1
            owner.auth_headers.append(self.headers.get("Authorization", ""))
            owner.prompts.append(prompt)
        if owner.delay_s:
            time.sleep(owner.delay_s)
        fault = owner._next_fault()
        if fault is not None:
            with owner.lock:
                owner.faults_served[fault[0]] += 1
            if self._serve_fault(fault[0], fault[1], prompt, model):
                return
        self._answer(prompt, model)

    def _serve_fault(self, mode: str, params: dict[str, Any], prompt: str, model: str) -> bool:
        """Serve ``mode``; False means "now answer normally" (``slow``)."""
        if mode == "429":
            retry_after = str(params.get("retry_after", 0))
            self._send_json(
                429,
                {"error": {"message": "rate limited", "type": "rate_limit"}},
                {"Retry-After": retry_after},
            )
        elif mode == "500":
            self._send_json(500, {"error": {"message": "boom", "type": "server_error"}})
        elif mode == "400":
            self._send_json(400, {"error": {"message": "bad request", "type": "invalid"}})
        elif mode == "401":
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            self._send_json(
                401,
                {
                    "error": {
                        "message": f"Incorrect API key provided: {token}",
                        "type": "invalid_request_error",
                    }
                },
            )
        elif mode == "slow":
            time.sleep(float(params.get("slow_s", self.server_owner.slow_s)))
            return False
        elif mode == "garbage":
            self._send_json(200, _completion(model, "I think it is pretty good overall!"))
        elif mode == "badbody":
            self._send(200, b"<html>this is not json", content_type="application/json")
        elif mode == "truncated":
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'{"id": "chatcmpl-')
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
        return True

    def _answer(self, prompt: str, model: str) -> None:
        owner = self.server_owner
        score = expected_score(prompt)
        content = json.dumps({"score": score, "reason": f"hash score {score}"})
        if owner.fence:
            content = f"Here is my grading.\n```json\n{content}\n```\nHope this helps."
        with owner.lock:
            owner.answered[prompt_hash(prompt)] += 1
        self._send_json(200, _completion(model, content))


def _completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
