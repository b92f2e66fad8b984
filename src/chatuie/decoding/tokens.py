"""Token table: token id -> UTF-8 bytes, organised as a byte trie (built once per tokenizer)."""

from __future__ import annotations

import itertools
import json
import re
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: byte-level BPE piece characters -> bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_table_uids = itertools.count()


def _component_types(config: Any) -> set[str]:
    """Every ``type`` named in a tokenizers component config (Sequence components nest)."""
    found: set[str] = set()
    if isinstance(config, dict):
        if isinstance(config.get("type"), str):
            found.add(config["type"])
        for value in config.values():
            found |= _component_types(value)
    elif isinstance(config, list):
        for value in config:
            found |= _component_types(value)
    return found


class TokenTable:
    """Token bytes of one tokenizer, as a byte trie.

    ``token_bytes[i]`` is what token ``i`` adds to the decoded UTF-8 output (``None`` for special
    tokens, which never appear inside an answer). Trie node ``n`` has ``children[n]`` (byte -> node)
    and ``node_ids[n]`` (the tokens whose bytes spell the path to ``n``); node 0 is the root.
    """

    def __init__(
        self,
        token_bytes: Sequence[bytes | None],
        eos_ids: Iterable[int],
        pad_id: int | None = None,
    ) -> None:
        self.token_bytes: list[bytes | None] = list(token_bytes)
        self.vocab_size = len(self.token_bytes)
        self.eos_ids: tuple[int, ...] = tuple(sorted(set(eos_ids)))
        self.pad_id = pad_id
        self.uid = next(_table_uids)
        children: list[dict[int, int]] = [{}]
        node_ids: list[tuple[int, ...]] = [()]
        for token_id, data in enumerate(self.token_bytes):
            if not data:
                continue
            node = 0
            for byte in data:
                child = children[node].get(byte)
                if child is None:
                    child = len(children)
                    children.append({})
                    node_ids.append(())
                    children[node][byte] = child
                node = child
            node_ids[node] += (token_id,)
        self.children = children
        self.node_ids = node_ids
        # Every byte is a token by itself (byte-level BPE, byte fallback): any byte path is
        # realisable one token per byte.
        self.has_all_bytes = all(
            (child := children[0].get(byte)) is not None and node_ids[child] for byte in range(256)
        )
        self._counts: dict[bytes, int] = {}

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenTable:
        return cls(
            _token_bytes_of(tokenizer),
            eos_ids=_as_id_list(getattr(tokenizer, "eos_token_id", None)),
            pad_id=getattr(tokenizer, "pad_token_id", None),
        )

    def greedy_tokens(self, data: bytes) -> list[int] | None:
        """Longest-match tokenization of ``data`` (``None`` if some byte has no token)."""
        out: list[int] = []
        children, node_ids = self.children, self.node_ids
        pos = 0
        while pos < len(data):
            node, best, best_end = 0, -1, pos
            for end in range(pos, len(data)):
                node = children[node].get(data[end], -1)
                if node < 0:
                    break
                if node_ids[node]:
                    best, best_end = node_ids[node][0], end + 1
            if best < 0:
                return None
            out.append(best)
            pos = best_end
        return out

    def count_tokens(self, data: bytes) -> int:
        """Length of the longest-match tokenization of ``data`` (cached; huge if impossible)."""
        count = self._counts.get(data)
        if count is None:
            tokens = self.greedy_tokens(data)
            count = self._counts[data] = len(tokens) if tokens is not None else 1 << 30
        return count

    def decode(self, token_ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes[t] or b"" for t in token_ids)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value]


def _token_bytes_of(tokenizer: Any) -> list[bytes | None]:
    """What each token id contributes to the decoded text, as bytes."""
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = {i for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
    added_content: dict[int, str] = {}
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(token_id)
        else:
            added_content[token_id] = str(getattr(added, "content", added))

    backend = getattr(tokenizer, "backend_tokenizer", None)
    config: dict[str, Any] = json.loads(backend.to_str()) if backend is not None else {}
    decoder_types = _component_types(config.get("decoder"))
    byte_level = "ByteLevel" in decoder_types or (
        not decoder_types and "ByteLevel" in _component_types(config.get("pre_tokenizer"))
    )
    vocab_pieces = {p for p in pieces if p}
    byte_fallback = (
        bool((config.get("model") or {}).get("byte_fallback"))
        or "ByteFallback" in decoder_types
        or (backend is None and "<0x00>" in vocab_pieces)
    )
    byte_decoder = _gpt2_byte_decoder() if byte_level else {}

    out: list[bytes | None] = []
    for token_id, piece in enumerate(pieces):
        if piece is None:
            out.append(None)
            continue
        if byte_fallback and (match := _BYTE_PIECE.match(piece)):
            # Byte-fallback pieces are single raw bytes even where they are marked special.
            out.append(bytes([int(match.group(1), 16)]))
        elif token_id in special:
            out.append(None)
        elif token_id in added_content:
            out.append(added_content[token_id].encode("utf-8", "surrogatepass"))
        elif byte_level:
            if all(ch in byte_decoder for ch in piece):
                out.append(bytes(byte_decoder[ch] for ch in piece))
            else:
                out.append(piece.encode("utf-8", "surrogatepass"))
        else:
            # Sentencepiece-style: "▁" is a space (Metaspace / Llama Replace decoders).
            out.append(piece.replace("\u2581", " ").encode("utf-8", "surrogatepass"))
    return out


_TABLES: weakref.WeakKeyDictionary[Any, TokenTable] = weakref.WeakKeyDictionary()
_TABLES_BY_NAME: dict[tuple[str, str, int], TokenTable] = {}


def clear_token_tables() -> None:
    """Forget every cached token table."""
    _TABLES.clear()
    _TABLES_BY_NAME.clear()


def token_table(tokenizer: Any) -> TokenTable:
    """The (cached) :class:`TokenTable` of ``tokenizer``."""
    try:
        table = _TABLES.get(tokenizer)
        if table is None or table.vocab_size != len(tokenizer):
            table = _TABLES[tokenizer] = TokenTable.from_tokenizer(tokenizer)
        return table
    except TypeError:  # not weak-referenceable: key by what names the vocabulary
        key = (
            type(tokenizer).__name__,
            str(getattr(tokenizer, "name_or_path", "")),
            len(tokenizer),
        )
        if key not in _TABLES_BY_NAME:
            _TABLES_BY_NAME[key] = TokenTable.from_tokenizer(tokenizer)
        return _TABLES_BY_NAME[key]
