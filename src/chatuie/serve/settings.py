"""The HTTP server's settings: model name, API key, batching, request limits (:class:`ServerSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

API_KEY_ENV = "CHATUIE_API_KEY"


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
