"""Reading and checking the server's requests: JSON bodies under a size limit, chat completions
(:func:`parse_ie_prompt` recognises an IE instruction of this project) and ``/v1/extract``. A bad
request raises :class:`ApiError`, which the app answers as OpenAI does (:mod:`chatuie.serve.server`).
"""

from __future__ import annotations

import json
from typing import Any

from chatuie.data.prompts import DEFAULT_OPTIONS, SYSTEM_PROMPT, TEXT_LINE, ChatOptions, ie_user_prompt
from chatuie.data.records import Schema
from chatuie.data.schema import ExtractionSchema, SchemaError
from chatuie.data.text import text_problem
from chatuie.errors import printable
from chatuie.serve.settings import ServerSettings

_TASKS = {"named entity recognition": "ner", "relation extraction": "re", "event extraction": "ee"}
_ROLES = {"system", "user", "assistant", "developer"}
_EXTRACT_KEYS = {"text", "schema"}


class ApiError(Exception):
    """An answer with a 4xx/5xx status; ``param`` names the request field at fault (as OpenAI)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        message = printable(message)  # quoted input may hold an unpaired surrogate: never sendable
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def _check_text(value: str, where: str) -> str:
    """400 naming ``where`` for text no tokenizer can encode (an unpaired surrogate)."""
    problem = text_problem(value)
    if problem is not None:
        raise ApiError(400, f"{where}: {problem}", "invalid_text", where)
    return value


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


def parse_chat(body: Any, settings: ServerSettings, chat: ChatOptions = DEFAULT_OPTIONS) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------------
# /v1/extract


async def read_json(request: Any, limit: int) -> Any:
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


def parse_extract(body: Any, settings: ServerSettings) -> tuple[str, ExtractionSchema]:
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
