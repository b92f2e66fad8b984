"""Grammar-constrained decoding: the model can only write valid, grounded IE answers.

A :class:`IEConstraintProcessor` (a ``transformers`` ``LogitsProcessor``) masks, at every step and
for every row of a batch, the tokens that would leave the answer language of that row's request:

* compact JSON of the documented output format (:mod:`chatuie.output_format`), no whitespace
  outside strings; EOS only once the JSON is complete, and then nothing but EOS (and pad);
* every label / relation type / event type of the request's schema exactly once, in the schema's
  order (the model never chooses keys, only what each list holds); roles from the event type's
  own roles, each at most once and in that type's order;
* every span a non-empty substring of the request's text; with ``span_boundaries="word"`` (the
  default) one that also starts and ends on word boundaries: never inside a run of letters or
  digits of a space-separated script, never on a space. CJK ideographs, kana and hangul are each a
  word of their own, so Chinese spans stay character-level. (Gold spans never cut a word; a model
  that has not learnt where words end would otherwise close ``"S"`` of ``Smith``.)

Everything runs over UTF-8 **bytes**, so the constraint holds whatever the tokenizer does with
characters: a token is allowed iff its bytes take the grammar automaton from the current state to
a live state. A token may straddle span edges (``ng"]``), start with a Metaspace space, be a
GPT-2 byte-level piece or a ``<0xE4>`` byte-fallback piece. A span may be closed only when its
bytes form a complete UTF-8 string occurring in the text's UTF-8 bytes; UTF-8 is
self-synchronising, so that is exactly a character-level substring.

Escapes: a text character ``"`` or ``\\`` is written ``\\"`` / ``\\\\`` inside a span and
counts as that one character; no other escape is produced or accepted. Text characters below
U+0020 (newline, tab, ...) would need ``\\n``-style escapes and **cannot be part of a span**:
spans never cross them.

The automaton (per request, :class:`IEGrammar`): a small graph of structure nodes (literal bytes,
key tries over the JSON-encoded labels, span slots) times a suffix automaton over the text bytes
for span slots. A state is a hashable tuple, so the allowed-token set of a state is computed once
(a joint walk of the token trie and the automaton, pruning dead branches) and then cached.

Budget: generation may stop at ``max_new_tokens`` mid-answer. :meth:`IEGrammar.complete` closes
any prefix validly (an open span is closed at its current content when that is already a valid
non-empty substring, otherwise the answer drops back to the last point where it can be closed
without inventing anything). With ``max_new_tokens`` the processor is also budget-aware: near
the end it only allows tokens after which the answer can still be closed in the tokens left.

Rules that depend on what a row already wrote (no grammar state could hold them) are applied by
the processor, :meth:`IEConstraintProcessor._row_rules`: a list names each mention once per
occurrence in the text, a relation's head and tail are spans of the answer's own entity block
(the tail another than the head), and a relation list names each head/tail pair once. They
give way when they would leave no token, and near the end of the token budget.

Limitations: the answer must start with ``{`` (``allow_leading_space`` admits one space first,
for sentencepiece chat models that put ``▁{`` after the prompt); beam search works (reordered
rows are re-parsed) but re-parsing costs O(answer length) per moved row.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from chatuie.output_format import is_word_char
from chatuie.records import IE_TASKS, Schema

__all__ = [
    "AnswerRepetitionPenalty",
    "IEConstraintProcessor",
    "IEGrammar",
    "IERequest",
    "TokenTable",
    "clear_caches",
    "complete_answer",
    "constrained_generate",
    "ie_grammar",
    "token_table",
    "word_edges",
]

# A grammar state: (structure node, sub-state, roles used in the current arguments object). The
# sub-state is a key-trie node in key slots and
# ``sam_state << 3 | pending_utf8_bytes << 1 | in_escape`` in span slots.
State = tuple[int, int, int]

_LIT, _KEY, _SPAN, _DONE = 0, 1, 2, 3
_QUOTE, _BACKSLASH = 0x22, 0x5C


# --------------------------------------------------------------------------------------------
# Token table: token id -> bytes, organised as a trie (built once per tokenizer)


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


# --------------------------------------------------------------------------------------------
# The grammar automaton of one request


SPAN_BOUNDARIES = ("word", "char")


def word_edges(text: str) -> tuple[frozenset[int], frozenset[int]]:
    """UTF-8 byte offsets where a word-aligned span may start, and where it may end."""
    starts: set[int] = set()
    ends: set[int] = set()
    offset = 0
    for i, ch in enumerate(text):
        size = len(ch.encode("utf-8", "surrogatepass"))
        if not ch.isspace():
            word = is_word_char(ch)
            if not (word and i > 0 and is_word_char(text[i - 1])):
                starts.add(offset)
            if not (word and i + 1 < len(text) and is_word_char(text[i + 1])):
                ends.add(offset + size)
        offset += size
    return frozenset(starts), frozenset(ends)


class _AlignedSpans:
    """The substrings of ``data`` starting at an offset in ``starts``, as a DFA whose states are
    the sets of end offsets of the span so far; state ``s`` may close iff ``final[s]`` (an end
    offset in ``ends``). Built lazily, one state at a time: only the states decoding reaches (a
    full construction is quadratic in the text for Chinese, where every offset is a start)."""

    def __init__(self, data: bytes, starts: frozenset[int], ends: frozenset[int]) -> None:
        self._data = data
        self._ends = ends
        # live[p]: a span that has reached offset p can still end (an end at or after p, with no
        # control character on the way). Moves go only to live offsets, so no move leads to a
        # state that can never close (": " would otherwise let a span take the final space).
        live = [False] * (len(data) + 1)
        live[len(data)] = len(data) in ends
        for position in range(len(data) - 1, -1, -1):
            live[position] = position in ends or (data[position] >= 0x20 and live[position + 1])
        self._live = live
        self._ids: dict[frozenset[int], int] = {}
        self._sets: list[frozenset[int]] = []
        self._moves: list[dict[int, int] | None] = []
        self.final: list[bool] = []
        self._intern(frozenset(starts))
        self.final[0] = False  # the empty span (its set is smaller than any non-empty one's)

    def _intern(self, positions: frozenset[int]) -> int:
        sid = self._ids.get(positions)
        if sid is None:
            sid = self._ids[positions] = len(self._sets)
            self._sets.append(positions)
            self._moves.append(None)
            self.final.append(not self._ends.isdisjoint(positions))
        return sid

    def __getitem__(self, sid: int) -> dict[int, int]:
        moves = self._moves[sid]
        if moves is None:
            data, size = self._data, len(self._data)
            grouped: dict[int, list[int]] = {}
            for position in self._sets[sid]:
                if position < size and self._live[position + 1]:
                    grouped.setdefault(data[position], []).append(position + 1)
            moves = self._moves[sid] = {byte: self._intern(frozenset(ends)) for byte, ends in grouped.items()}
        return moves


def _suffix_automaton(data: bytes) -> list[dict[int, int]]:
    """Transitions of the suffix automaton of ``data``: paths from state 0 = its substrings."""
    nxt: list[dict[int, int]] = [{}]
    link = [-1]
    length = [0]
    last = 0
    for byte in data:
        cur = len(nxt)
        nxt.append({})
        length.append(length[last] + 1)
        link.append(0)
        p = last
        while p != -1 and byte not in nxt[p]:
            nxt[p][byte] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][byte]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(nxt)
                nxt.append(dict(nxt[q]))
                length.append(length[p] + 1)
                link.append(link[q])
                while p != -1 and nxt[p].get(byte) == q:
                    nxt[p][byte] = clone
                    p = link[p]
                link[q] = clone
                link[cur] = clone
        last = cur
    return nxt


def _utf8_tail(lead: int) -> int:
    """Continuation bytes that follow a lead byte (-1: not a character start)."""
    if lead < 0x80:
        return 0
    if lead < 0xC0:
        return -1
    if lead < 0xE0:
        return 1
    if lead < 0xF0:
        return 2
    if lead < 0xF8:
        return 3
    return -1


def _dedupe(labels: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(labels))


def _unescape(span: bytes) -> bytes:
    """Span bytes as written in the answer (``\\"``, ``\\\\``) -> the text's bytes."""
    return span.replace(b"\\\\", b"\x00").replace(b'\\"', b'"').replace(b"\x00", b"\\")


def _before_quote(data: bytes, escaped: bool) -> bytes:
    """The span content a token that closes the span adds before its closing quote."""
    i = 0
    while i < len(data):
        if escaped:
            escaped = False
        elif data[i] == _BACKSLASH:
            escaped = True
        elif data[i] == _QUOTE:
            break
        i += 1
    return data[:i]


def _json_key(label: str) -> bytes:
    return json.dumps(label, ensure_ascii=False).encode("utf-8", "surrogatepass")


@dataclass
class IERequest:
    """One row to constrain: the task, the input text and the labels it may use."""

    task: str
    text: str
    schema: Schema
    span_boundaries: str = "word"  # "word": spans never cut a word (see the module doc) | "char"


def _id_tensor(ids: list[int], device: torch.device, vocab: int) -> torch.Tensor:
    if ids and max(ids) >= vocab:  # tokenizer larger than the model's vocabulary
        ids = [i for i in ids if i < vocab]
    return torch.tensor(ids, dtype=torch.long, device=device)


class _SpanWalk:
    """Tokens that stay inside a span from one span sub-state (shared by every span slot and
    every used-keys mask), and the trie nodes at which the span may close."""

    __slots__ = ("ids", "subs", "closing", "_tensors")

    def __init__(self, ids: list[int], subs: list[int], closing: list[int]) -> None:
        self.ids = ids
        self.subs = subs
        self.closing = closing
        self._tensors: dict[tuple[torch.device, int], torch.Tensor] = {}

    def tensor(self, device: torch.device, vocab: int) -> torch.Tensor:
        key = (device, vocab)
        cached = self._tensors.get(key)
        if cached is None:
            cached = self._tensors[key] = _id_tensor(self.ids, device, vocab)
        return cached


class _Allowed:
    """The tokens allowed in one state, with the state each leads to (built on demand)."""

    __slots__ = ("_ids", "_states", "_span", "ranked_needs", "ranked_ids", "_tensors")

    def __init__(
        self,
        ids: list[int] | None,
        states: list[State] | None,
        span: tuple[State, _SpanWalk, list[int], list[State]] | None = None,
    ) -> None:
        self._ids = ids
        self._states = states
        # Span states: (state, inside-span walk, ids crossing the closing quote, their states);
        # the inside part is shared, so the lists of this state are only built when asked for.
        self._span = span
        # For the budget: the tokens sorted by what completing needs after them (lazy).
        self.ranked_needs: list[int] | None = None
        self.ranked_ids: list[int] = []
        self._tensors: dict[tuple[int, torch.device, int], torch.Tensor] = {}

    @property
    def ids(self) -> list[int]:
        if self._ids is None:
            assert self._span is not None
            _, inside, crossing_ids, _ = self._span
            self._ids = inside.ids + crossing_ids
        return self._ids

    @property
    def states(self) -> list[State]:
        if self._states is None:
            assert self._span is not None
            (node, _, used), inside, _, crossing_states = self._span
            self._states = [(node, sub, used) for sub in inside.subs]
            self._states += crossing_states
        return self._states

    def __bool__(self) -> bool:
        if self._span is not None:
            return bool(self._span[1].ids or self._span[2])
        return bool(self._ids)

    def tensor(self, device: torch.device, vocab: int, cut: int = -1) -> torch.Tensor:
        """All the tokens (``cut < 0``), or the ``cut`` cheapest to complete after."""
        key = (cut, device, vocab)
        cached = self._tensors.get(key)
        if cached is None:
            if cut >= 0:
                cached = _id_tensor(self.ranked_ids[:cut], device, vocab)
            elif self._span is not None:
                _, inside, crossing_ids, _ = self._span
                cached = torch.cat([inside.tensor(device, vocab), _id_tensor(crossing_ids, device, vocab)])
            else:
                cached = _id_tensor(self.ids, device, vocab)
            self._tensors[key] = cached
        return cached


class IEGrammar:
    """The byte automaton of the answers allowed for one (task, text, schema)."""

    def __init__(
        self,
        task: str,
        text: str,
        schema: Schema,
        *,
        allow_leading_space: bool = False,
        span_boundaries: str = "word",
    ) -> None:
        if task not in IE_TASKS:
            raise ValueError(f"task {task!r} has no IE output format (expected one of {IE_TASKS})")
        if span_boundaries not in SPAN_BOUNDARIES:
            raise ValueError(f"span_boundaries: expected one of {SPAN_BOUNDARIES}, got {span_boundaries!r}")
        self.task = task
        self.text = text
        self.schema = schema
        self.span_boundaries = span_boundaries
        self.text_bytes = text.encode("utf-8", "surrogatepass")
        # Span content: transitions per span state (0 = empty) and whether a span may end there.
        self._spans: Any
        if span_boundaries == "char":
            self._spans = _suffix_automaton(self.text_bytes)
            self._span_final: list[bool] = [False] + [True] * (len(self._spans) - 1)
        else:
            self._spans = _AlignedSpans(self.text_bytes, *word_edges(text))
            self._span_final = self._spans.final
        root = self._spans[0]
        self.spans_possible = any(b >= 0x20 and _utf8_tail(b) >= 0 for b in root)

        self._kind: list[int] = []
        self._lits: list[dict[int, int]] = []
        self._next: list[int] = []  # key / span slots: the node after the closing quote
        self._key_root: list[int] = []  # key slots: the root of their label trie
        self._keep: list[bool] = []  # whether the used-roles mask matters here (else it is empty)
        self._kt_children: list[dict[int, int]] = []
        self._kt_mask: list[int] = []  # bitmask of the labels below a key-trie node
        self._kt_label: list[int] = []  # label index completed at this node (after its quote)
        # For the processor's per-row rules (see IEConstraintProcessor): the span slots of span
        # lists (entities, arguments), the "[" of those lists, the head / tail slots of relations.
        self.listed_spans: set[int] = set()
        self.list_starts: set[int] = set()
        self.relation_args: set[int] = set()
        self.relation_heads: set[int] = set()
        self.relation_list_starts: set[int] = set()
        self._occurrences: dict[bytes, int] = {}
        self.done = self._node(_DONE, keep=False)
        start = {"ner": self._build_ner, "re": self._build_re, "ee": self._build_ee}[task]()
        if allow_leading_space:  # a single space before "{" (sentencepiece chat answers)
            pre = self._node(_LIT)
            self._lits[pre] = dict(self._lits[start])
            self._lits[pre][0x20] = start
            start = pre
        self._closer = self._literal_closers()
        # No shortest completion is longer than this many bytes (so, tokens): finish the
        # longest label, invent at most two spans (4-byte characters, escaped quotes), take the
        # longest literal run; used to skip budget checks far from the end.
        longest_label = max((len(_json_key(label)) for label in self._all_labels()), default=0)
        longest_literal = max(len(c) for c in self._closer if c is not None)
        self.max_completion_bytes = longest_label + longest_literal + 64

        self._enter_cache: dict[tuple[int, int], State | None] = {}
        self._trans_cache: dict[State, dict[int, State]] = {}
        self._span_move_cache: dict[int, dict[int, int]] = {}
        self._span_walk_cache: dict[int, dict[int, _SpanWalk]] = {}
        self._allowed_cache: dict[int, dict[State, _Allowed]] = {}
        self._ext_cache: dict[State, bytes] = {}
        self._ext_active: set[State] = set()
        self._key_suffix_cache: dict[tuple[int, int], bytes | None] = {}
        self._need_cache: dict[tuple[Any, ...], int] = {}
        initial = self._enter(start, 0)
        if initial is None:  # cannot happen: "{}" (or the re skeleton) is always possible
            raise RuntimeError("the answer grammar has no valid answer")
        self.initial: State = initial

    def _all_labels(self) -> list[str]:
        roles = [role for event_roles in self.schema.events.values() for role in event_roles]
        return [*self.schema.entities, *self.schema.relations, *self.schema.events, *roles]

    # -- construction -------------------------------------------------------------------------

    def _node(self, kind: int, *, keep: bool = True) -> int:
        self._kind.append(kind)
        self._lits.append({})
        self._next.append(-1)
        self._key_root.append(-1)
        self._keep.append(keep)
        return len(self._kind) - 1

    def _lit(self, src: int, data: bytes, dst: int, keep: bool = True) -> None:
        """Literal ``data`` from ``src`` to ``dst`` (intermediate nodes created as needed)."""
        node = src
        for i, byte in enumerate(data):
            if i == len(data) - 1:
                self._lits[node][byte] = dst
            else:
                nxt = self._lits[node].get(byte)
                if nxt is None:
                    nxt = self._node(_LIT, keep=keep)
                    self._lits[node][byte] = nxt
                node = nxt

    def _key_trie(self, labels: list[str]) -> int:
        """A trie over the JSON-encoded labels after their opening quote; returns its root."""

        def new() -> int:
            self._kt_children.append({})
            self._kt_mask.append(0)
            self._kt_label.append(-1)
            return len(self._kt_children) - 1

        root = new()
        for index, label in enumerate(labels):
            node = root
            self._kt_mask[node] |= 1 << index
            for byte in _json_key(label)[1:]:  # JSON strings are prefix-free: leaves end labels
                child = self._kt_children[node].get(byte)
                if child is None:
                    child = new()
                    self._kt_children[node][byte] = child
                node = child
                self._kt_mask[node] |= 1 << index
            self._kt_label[node] = index
        return root

    def _key_node(self, root: int, after: int) -> int:
        node = self._node(_KEY)
        self._key_root[node] = root
        self._next[node] = after
        return node

    def _span_node(self, after: int, keep: bool = True) -> int:
        node = self._node(_SPAN, keep=keep)
        self._next[node] = after
        return node

    def _items(
        self, list_start: int, after_list: int, opener: bytes, item: int, after_item: int, keep: bool = True
    ) -> None:
        """``ITEM,...]`` (or ``]``) after a list's "[": each item opens with ``opener`` into
        ``item`` and is done at ``after_item``."""
        list_again = self._node(_LIT, keep=keep)
        self._lit(list_start, b"]", after_list)
        self._lit(list_start, opener, item)
        self._lit(after_item, b",", list_again)
        self._lit(after_item, b"]", after_list)
        self._lit(list_again, opener, item)

    def _span_list(self, list_start: int, after_list: int, keep: bool = True) -> None:
        """``[SPAN,...]`` after its "[" (``list_start``), ending at ``after_list``."""
        after_item = self._node(_LIT, keep=keep)
        span = self._span_node(after_item, keep=keep)
        self.list_starts.add(list_start)
        self.listed_spans.add(span)
        self._items(list_start, after_list, b'"', span, after_item, keep)

    def _label_lists(
        self,
        labels: list[str],
        fill: Callable[[int, int, int], None],
        after_close: int,
        keep: bool = True,
    ) -> int:
        """``"L1":[...],"L2":[...]}`` after an object's "{": every label exactly once, in the
        schema's order (the documented format), so the model never chooses keys, only what each
        list holds. ``fill(index, list_start, after_list)`` wires a list's items. Returns the node
        right after "{"."""
        first = self._node(_LIT, keep=keep)
        node = first
        for index, label in enumerate(labels):
            list_start = self._node(_LIT, keep=keep)
            after_list = self._node(_LIT, keep=keep)
            self._lit(node, (b"," if index else b"") + _json_key(label) + b":[", list_start, keep=keep)
            fill(index, list_start, after_list)
            node = after_list
        self._lit(node, b"}", after_close, keep=keep)
        return first

    def _build_ner(self) -> int:
        start = self._node(_LIT)
        labels = _dedupe(self.schema.entities)
        self._lit(start, b"{", self._label_lists(labels, lambda _, s, e: self._span_list(s, e), self.done))
        return start

    def _build_re(self) -> int:
        start = self._node(_LIT)
        entities_done = self._node(_LIT)
        relations_done = self._node(_LIT)  # after the relations object's "}"

        def relation_list(_: int, list_start: int, after_list: int) -> None:
            item = self._node(_LIT)  # after "{" of a relation
            after_head = self._node(_LIT)
            after_tail = self._node(_LIT)
            after_item = self._node(_LIT)
            head = self._span_node(after_head)
            tail = self._span_node(after_tail)
            self.relation_args.update((head, tail))
            self.relation_heads.add(head)
            self.relation_list_starts.add(list_start)
            self._items(list_start, after_list, b"{", item, after_item)
            self._lit(item, b'"head":"', head)
            self._lit(after_head, b',"tail":"', tail)
            self._lit(after_tail, b"}", after_item)

        entity_lists = self._label_lists(
            _dedupe(self.schema.entities), lambda _, s, e: self._span_list(s, e), entities_done
        )
        self._lit(start, b'{"entities":{', entity_lists)
        relation_lists = self._label_lists(_dedupe(self.schema.relations), relation_list, relations_done)
        self._lit(entities_done, b',"relations":{', relation_lists)
        self._lit(relations_done, b"}", self.done)
        return start

    def _build_ee(self) -> int:
        types = _dedupe(self.schema.events)
        # Only the used-roles mask of an event's arguments object matters; everywhere else states
        # drop it so that equal futures share one cache entry.
        outer = False
        start = self._node(_LIT, keep=outer)

        def event_list(index: int, list_start: int, after_list: int) -> None:
            role_root = self._key_trie(_dedupe(self.schema.events[types[index]]))
            item = self._node(_LIT, keep=outer)  # after "{" of an event
            after_trigger = self._node(_LIT, keep=outer)
            args_first = self._node(_LIT, keep=False)  # after '"arguments":{': no role used yet
            args_again = self._node(_LIT)
            args_done = self._node(_LIT, keep=outer)  # after the arguments' "}"
            role_after_key = self._node(_LIT)
            role_key = self._key_node(role_root, role_after_key)
            role_list = self._node(_LIT)
            role_after_list = self._node(_LIT)
            after_item = self._node(_LIT, keep=outer)
            trigger = self._span_node(after_trigger, keep=outer)
            self._items(list_start, after_list, b"{", item, after_item, keep=outer)
            self._lit(item, b'"trigger":"', trigger, keep=outer)
            self._lit(after_trigger, b',"arguments":{', args_first, keep=outer)
            self._lit(args_first, b"}", args_done)
            self._lit(args_first, b'"', role_key)
            self._lit(args_again, b'"', role_key)
            self._lit(role_after_key, b":[", role_list)
            self._span_list(role_list, role_after_list)
            self._lit(role_after_list, b",", args_again)
            self._lit(role_after_list, b"}", args_done)
            self._lit(args_done, b"}", after_item)

        self._lit(start, b"{", self._label_lists(types, event_list, self.done, keep=outer))
        return start

    def _literal_closers(self) -> list[bytes | None]:
        """Per node: the shortest literal bytes to a complete answer (never entering a key or a
        span), ``None`` where every completion needs new label or span text."""
        into: list[list[tuple[int, int]]] = [[] for _ in self._kind]  # reversed literal edges
        for node, lits in enumerate(self._lits):
            if self._kind[node] == _LIT:
                for byte, dst in lits.items():
                    if self._kind[dst] in (_LIT, _DONE):
                        into[dst].append((node, byte))
        closer: list[bytes | None] = [None] * len(self._kind)
        closer[self.done] = b""
        queue = deque([self.done])
        while queue:  # breadth-first from the end: every edge is one byte, first reach is best
            dst = queue.popleft()
            for node, byte in sorted(into[dst], key=lambda edge: edge[1]):
                if closer[node] is None:
                    closer[node] = bytes([byte]) + closer[dst]  # type: ignore[operator]
                    queue.append(node)
        return closer

    # -- stepping -----------------------------------------------------------------------------

    def _enter(self, node: int, used: int) -> State | None:
        """The state on entering ``node``, or ``None`` when no complete answer follows."""
        key = (node, used)
        if key in self._enter_cache:
            return self._enter_cache[key]
        if not self._keep[node]:
            used = 0
        kind = self._kind[node]
        state: State | None = (node, 0, used)
        if kind == _LIT:
            # The grammar has no cycle through literal nodes only, so this recursion ends.
            if not any(self._enter(d, used) for d in self._lits[node].values()):
                state = None
        elif kind == _KEY:
            root = self._key_root[node]
            state = (node, root, used) if self._kt_mask[root] & ~used else None
        elif kind == _SPAN:
            state = state if self.spans_possible else None
        self._enter_cache[key] = state
        return state

    def transitions(self, state: State) -> dict[int, State]:
        """Byte -> next state, for every byte allowed in ``state`` (cached)."""
        cached = self._trans_cache.get(state)
        if cached is not None:
            return cached
        node, sub, used = state
        kind = self._kind[node]
        out: dict[int, State] = {}
        if kind == _LIT:
            for byte, dst in self._lits[node].items():
                nxt = self._enter(dst, used)
                if nxt is not None:
                    out[byte] = nxt
        elif kind == _KEY:
            for byte, child in self._kt_children[sub].items():
                if not self._kt_mask[child] & ~used:
                    continue
                label = self._kt_label[child]
                if label < 0:
                    out[byte] = (node, child, used)
                    continue
                # Roles come in schema order (the documented format): the ones before are done.
                nxt = self._enter(self._next[node], used | (2 << label) - 1)
                if nxt is not None:
                    out[byte] = nxt
        elif kind == _SPAN:
            for byte, nxt_sub in self._span_moves(sub).items():
                out[byte] = (node, nxt_sub, used)
            if not sub & 7 and self._span_final[sub >> 3]:  # closable, no open character/escape
                nxt = self._enter(self._next[node], used)
                if nxt is not None:
                    out[_QUOTE] = nxt
        self._trans_cache[state] = out
        return out

    def _span_moves(self, sub: int) -> dict[int, int]:
        """Byte -> next span sub-state for the bytes of span content (not the closing quote)."""
        cached = self._span_move_cache.get(sub)
        if cached is not None:
            return cached
        sam, pending, escaped = sub >> 3, (sub >> 1) & 3, sub & 1
        moves = self._spans[sam]
        out: dict[int, int] = {}
        if escaped:
            for byte in (_QUOTE, _BACKSLASH):
                if byte in moves:
                    out[byte] = moves[byte] << 3
        elif pending:
            for byte, target in moves.items():
                if 0x80 <= byte < 0xC0:
                    out[byte] = target << 3 | (pending - 1) << 1
        else:
            for byte, target in moves.items():
                if byte < 0x20 or byte in (_QUOTE, _BACKSLASH):
                    continue  # control characters cannot be spanned; the others need "\"
                tail = _utf8_tail(byte)
                if tail >= 0:
                    out[byte] = target << 3 | tail << 1
            if _QUOTE in moves or _BACKSLASH in moves:
                out[_BACKSLASH] = sam << 3 | 1
        self._span_move_cache[sub] = out
        return out

    def step(self, state: State, byte: int) -> State | None:
        return self.transitions(state).get(byte)

    def advance(self, state: State, data: bytes) -> State | None:
        """The state after ``data``, or ``None`` if ``data`` leaves the grammar."""
        for byte in data:
            nxt = self.transitions(state).get(byte)
            if nxt is None:
                return None
            state = nxt
        return state

    def occurrences(self, span: bytes) -> int:
        """How often ``span`` (as written in the answer, JSON-escaped) occurs in the text."""
        count = self._occurrences.get(span)
        if count is None:
            needle, text = _unescape(span), self.text_bytes
            count, at = 0, text.find(needle)
            while at != -1 and needle:
                count += 1
                at = text.find(needle, at + 1)
            self._occurrences[span] = count
        return count

    def is_complete(self, state: State) -> bool:
        return state[0] == self.done

    def accepts(self, data: bytes) -> bool:
        """Whether ``data`` is a complete valid answer."""
        state = self.advance(self.initial, data)
        return state is not None and self.is_complete(state)

    # -- completion ---------------------------------------------------------------------------

    def is_span(self, node: int) -> bool:
        return self._kind[node] == _SPAN

    def is_safe(self, state: State) -> bool:
        """A point outside spans and keys from which literal bytes complete the answer."""
        return (
            self._kind[state[0]] != _SPAN
            and self._kind[state[0]] != _KEY
            and (self._closer[state[0]] is not None)
        )

    def close_now(self, state: State) -> bytes | None:
        """Bytes completing the answer from ``state`` without inventing text, or ``None``."""
        node, sub = state[0], state[1]
        kind = self._kind[node]
        if kind == _SPAN:
            if not sub & 7 and self._span_final[sub >> 3]:  # closable, no open character/escape
                rest = self._closer[self._next[node]]
                return None if rest is None else b'"' + rest
            return None
        if kind == _KEY:
            return None
        return self._closer[node]

    def complete(self, data: bytes) -> bytes:
        """The longest valid prefix of ``data``, closed: a parseable answer with valid spans.

        An open span is closed at its current content when that is already a valid non-empty
        substring; otherwise the answer drops back to the last point outside spans and keys.
        """
        state = self.initial
        safe_len, safe_state = 0, state
        consumed = 0
        for byte in data:
            nxt = self.transitions(state).get(byte)
            if nxt is None:
                break
            state = nxt
            consumed += 1
            if self.is_safe(state):
                safe_len, safe_state = consumed, state
        return self.close_from(data[:consumed], state, safe_len, safe_state)

    def close_from(self, out: bytes, state: State, safe_len: int, safe_state: State) -> bytes:
        closing = self.close_now(state)
        if closing is not None:
            return out + closing
        return out[:safe_len] + (self._closer[safe_state[0]] or b"")

    def extension(self, state: State) -> bytes:
        """Shortest bytes that complete the answer from ``state`` (may add span/key text)."""
        try:
            result = self._extension(state)
        except RecursionError:  # absurdly long labels: search instead of recursing
            self._ext_active.clear()
            result = None
        return result if result is not None else self._extension_search(state)

    def _extension(self, state: State) -> bytes | None:
        """Depth-first, memoised: literal closers end the recursion, spans are finished with
        as few bytes as possible, keys and other literals try every move. A state met again
        on its own path is a cycle: that branch is skipped (``None`` if nothing else is left;
        the result is then still a valid completion, and :meth:`_extension_search` backs up)."""
        cached = self._ext_cache.get(state)
        if cached is not None:
            return cached
        if state in self._ext_active:
            return None
        node, sub = state[0], state[1]
        kind = self._kind[node]
        if kind != _SPAN and kind != _KEY and self._closer[node] is not None:
            result: bytes | None = self._closer[node]
        elif kind == _KEY and self._closer[self._next[node]] is not None:
            # The rest of the shortest label still free, then literals (the same for any label).
            free = ~state[2]
            suffix = self._shortest_key_suffix(sub, free)
            result = None if suffix is None else suffix + self._closer[self._next[node]]
        else:
            moves = self.transitions(state)
            if kind == _SPAN and sub & 7:  # mid-character / mid-escape: any way to finish it
                options = list(moves.items())[:1]
            elif kind == _SPAN and _QUOTE in moves:  # closing is never longer
                options = [(_QUOTE, moves[_QUOTE])]
            else:
                options = list(moves.items())
            self._ext_active.add(state)
            try:
                result = None
                for byte, nxt in options:
                    rest = self._extension(nxt)
                    if rest is not None and (result is None or len(rest) + 1 < len(result)):
                        result = bytes([byte]) + rest
            finally:
                self._ext_active.discard(state)
        if result is not None:
            self._ext_cache[state] = result
        return result

    def _shortest_key_suffix(self, trie_node: int, free: int) -> bytes | None:
        """The shortest bytes from ``trie_node`` to the end of a label in ``free``."""
        key = (trie_node, free & self._kt_mask[trie_node])
        if key in self._key_suffix_cache:
            return self._key_suffix_cache[key]
        found: bytes | None = None
        queue = deque([(trie_node, b"")])
        while queue:
            current, path = queue.popleft()
            label = self._kt_label[current]
            if label >= 0 and (1 << label) & free:
                found = path
                break
            for byte, child in self._kt_children[current].items():
                if self._kt_mask[child] & free:
                    queue.append((child, path + bytes([byte])))
        self._key_suffix_cache[key] = found
        return found

    def _extension_search(self, state: State) -> bytes:
        """Breadth-first search for the shortest completion (keys, literals needing spans)."""
        parents: dict[State, tuple[State, int] | None] = {state: None}
        queue = deque([state])
        goal: State | None = None
        while queue:
            current = queue.popleft()
            if self._kind[current[0]] == _DONE:
                goal = current
                break
            for byte, nxt in self._extension_moves(current):
                if nxt not in parents:
                    parents[nxt] = (current, byte)
                    queue.append(nxt)
        if goal is None:
            raise RuntimeError(f"no completion from state {state}")
        path = []
        link = parents[goal]
        while link is not None:
            prev, byte = link
            path.append(byte)
            link = parents[prev]
        return bytes(reversed(path))

    def _extension_moves(self, state: State) -> Iterable[tuple[int, State]]:
        moves = self.transitions(state)
        if self._kind[state[0]] != _SPAN:
            return moves.items()
        sub = state[1]
        if not sub & 7 and _QUOTE in moves:
            return [(_QUOTE, moves[_QUOTE])]  # closing is never longer than continuing
        if sub & 7:  # mid-character or mid-escape: any one way to finish it
            return list(moves.items())[:1]
        return moves.items()

    def need_tokens(self, state: State, table: TokenTable) -> int:
        """Tokens needed to complete the answer from ``state`` (an upper bound: longest-match
        tokens of :meth:`extension`)."""
        key = (table.uid, state)
        cached = self._need_cache.get(key)
        if cached is None:
            node, sub = state[0], state[1]
            char_spans = self.span_boundaries == "char"
            if self._kind[node] == _SPAN and sub >> 3 and table.has_all_bytes and char_spans:
                # A non-empty span: finish the character or escape (one byte token each at most),
                # then close. Shared by all span states of a slot, whatever their content.
                # (Word-aligned spans may need the rest of a word first: the general bound below.)
                after = self._enter(self._next[node], state[2])
                if after is not None:
                    close_key = (table.uid, after, "close")
                    closing = self._need_cache.get(close_key)
                    if closing is None:
                        closing = table.count_tokens(b'"' + self.extension(after))
                        self._need_cache[close_key] = closing
                    cached = closing + ((sub >> 1) & 3) + (sub & 1)
            if cached is None:
                cached = table.count_tokens(self.extension(state))
            self._need_cache[key] = cached
        return cached

    # -- tokens -------------------------------------------------------------------------------

    def allowed(self, state: State, table: TokenTable) -> _Allowed:
        """Tokens whose bytes lead from ``state`` to a live state (EOS not included).

        Walks the token trie jointly with the automaton: a trie branch is entered only on a byte
        the automaton accepts, so the cost is the number of live token prefixes, never the vocab.
        In a span, the part of the walk inside the span depends on the span sub-state only and is
        shared (:meth:`_span_walk`); only tokens crossing the closing quote are walked per state.
        """
        per_table = self._allowed_cache.get(table.uid)
        if per_table is None:
            per_table = self._allowed_cache[table.uid] = {}
        cached = per_table.get(state)
        if cached is not None:
            return cached
        node = state[0]
        ids: list[int] = []
        states: list[State] = []
        if self._kind[node] == _SPAN:
            inside = self._span_walk(state[1], table)
            if inside.closing:
                after = self._enter(self._next[node], state[2])
                if after is not None:
                    children, node_ids = table.children, table.node_ids
                    stack: list[tuple[int, State]] = []
                    for trie_node in inside.closing:
                        child = children[trie_node][_QUOTE]
                        here = node_ids[child]
                        if here:
                            ids.extend(here)
                            states.extend([after] * len(here))
                        if children[child]:
                            stack.append((child, after))
                    self._walk(stack, table, ids, states)
            entry = _Allowed(None, None, (state, inside, ids, states))
        else:
            self._walk([(0, state)], table, ids, states)
            entry = _Allowed(ids, states)
        per_table[state] = entry
        return entry

    def _walk(
        self, stack: list[tuple[int, State]], table: TokenTable, ids: list[int], states: list[State]
    ) -> None:
        """Depth-first joint walk of the token trie and the automaton from ``stack``."""
        children, node_ids = table.children, table.node_ids
        trans_cache = self._trans_cache
        transitions = self.transitions
        while stack:
            trie_node, current = stack.pop()
            moves = trans_cache.get(current)
            if moves is None:
                moves = transitions(current)
            if not moves:
                continue
            branches = children[trie_node]
            if len(moves) <= len(branches):
                for byte, nxt in moves.items():
                    child = branches.get(byte)
                    if child is None:
                        continue
                    here = node_ids[child]
                    if here:
                        ids.extend(here)
                        states.extend([nxt] * len(here))
                    if children[child]:
                        stack.append((child, nxt))
            else:
                for byte, child in branches.items():
                    nxt = moves.get(byte)
                    if nxt is None:
                        continue
                    here = node_ids[child]
                    if here:
                        ids.extend(here)
                        states.extend([nxt] * len(here))
                    if children[child]:
                        stack.append((child, nxt))

    def _span_walk(self, sub: int, table: TokenTable) -> _SpanWalk:
        """The walk inside a span from sub-state ``sub`` (cached per token table)."""
        per_table = self._span_walk_cache.get(table.uid)
        if per_table is None:
            per_table = self._span_walk_cache[table.uid] = {}
        cached = per_table.get(sub)
        if cached is not None:
            return cached
        children, node_ids = table.children, table.node_ids
        move_cache = self._span_move_cache
        span_moves = self._span_moves
        ids: list[int] = []
        subs: list[int] = []
        # Trie nodes where the span content is closable and some token continues with '"'.
        final = self._span_final
        closing: list[int] = [0] if not sub & 7 and final[sub >> 3] and _QUOTE in children[0] else []
        stack = [(0, sub)]
        while stack:
            trie_node, current = stack.pop()
            moves = move_cache.get(current)
            if moves is None:
                moves = span_moves(current)
            branches = children[trie_node]
            if len(moves) <= len(branches):
                pairs = [(branches.get(b), s) for b, s in moves.items()]
            else:
                pairs = [(c, moves.get(b)) for b, c in branches.items()]
            for child, nxt in pairs:
                if child is None or nxt is None:
                    continue
                here = node_ids[child]
                if here:
                    ids.extend(here)
                    subs.extend([nxt] * len(here))
                grand = children[child]
                if grand:
                    stack.append((child, nxt))
                    if not nxt & 7 and final[nxt >> 3] and _QUOTE in grand:
                        closing.append(child)
        walk = per_table[sub] = _SpanWalk(ids, subs, closing)
        return walk


_GRAMMARS: OrderedDict[tuple[str, str, str, bool], IEGrammar] = OrderedDict()
_GRAMMAR_CACHE_SIZE = 256


def ie_grammar(request: IERequest, *, allow_leading_space: bool = False) -> IEGrammar:
    """The (LRU-cached) grammar of a request: repeated requests share their mask caches."""
    key = (
        request.task,
        request.text,
        json.dumps(request.schema.to_dict(), ensure_ascii=False),  # label order matters
        allow_leading_space,
        request.span_boundaries,
    )
    grammar = _GRAMMARS.get(key)
    if grammar is None:
        grammar = IEGrammar(
            request.task,
            request.text,
            request.schema,
            allow_leading_space=allow_leading_space,
            span_boundaries=request.span_boundaries,
        )
        _GRAMMARS[key] = grammar
        if len(_GRAMMARS) > _GRAMMAR_CACHE_SIZE:
            _GRAMMARS.popitem(last=False)
    else:
        _GRAMMARS.move_to_end(key)
    return grammar


def clear_caches(*, token_tables: bool = True) -> None:
    """Forget cached grammars (and token tables): benchmarks measure cold starts with this."""
    _GRAMMARS.clear()
    if token_tables:
        _TABLES.clear()
        _TABLES_BY_NAME.clear()


def _decode_answer(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass").lstrip(" ")


def complete_answer(request: IERequest, partial: str | bytes) -> str:
    """Close a (possibly truncated or invalid) answer: parseable JSON, every span valid."""
    data = partial.encode("utf-8", "surrogatepass") if isinstance(partial, str) else partial
    return _decode_answer(ie_grammar(request).complete(data))


# --------------------------------------------------------------------------------------------
# The logits processor


class _Row:
    """Decoding progress of one batch row."""

    __slots__ = (
        "grammar",
        "state",
        "out",
        "finished",
        "safe_len",
        "safe_state",
        "span_start",
        "listed",
        "entities",
        "head",
        "pairs",
    )

    def __init__(self, grammar: IEGrammar) -> None:
        self.grammar = grammar
        self.state = grammar.initial
        self.out = bytearray()
        self.finished = False
        self.safe_len = 0
        self.safe_state = grammar.initial
        self.span_start = 0  # where the open span's content starts in ``out``
        self.listed: dict[bytes, int] = {}  # spans (as written) of the open list, with counts
        self.entities: set[bytes] = set()  # every span listed so far (re: the entity block)
        self.head = b""  # the head of the relation being written
        self.pairs: set[tuple[bytes, bytes]] = set()  # (head, tail) pairs of the open relation list

    def step(self, byte: int) -> bool:
        """Consume one byte; ``False`` (nothing changed) if the grammar does not allow it."""
        grammar, state = self.grammar, self.state
        nxt = grammar.transitions(state).get(byte)
        if nxt is None:
            return False
        if nxt[0] != state[0]:
            if state[0] in grammar.listed_spans:  # this byte is the closing quote
                span = bytes(self.out[self.span_start :])
                self.listed[span] = self.listed.get(span, 0) + 1
                self.entities.add(span)
            elif state[0] in grammar.relation_heads:
                self.head = bytes(self.out[self.span_start :])
            elif state[0] in grammar.relation_args:  # the tail's closing quote
                self.pairs.add((self.head, bytes(self.out[self.span_start :])))
            if nxt[0] in grammar.list_starts:
                self.listed.clear()
            elif nxt[0] in grammar.relation_list_starts:
                self.pairs.clear()
            elif grammar.is_span(nxt[0]):
                self.span_start = len(self.out) + 1
        self.state = nxt
        self.out.append(byte)
        if grammar.is_safe(nxt):
            self.safe_len, self.safe_state = len(self.out), nxt
        return True


class IEConstraintProcessor(LogitsProcessor):
    """Masks every token that would leave the answer grammar of its row's request.

    ``requests[i]`` constrains row ``i`` (with ``num_return_sequences=k``, rows ``i*k ..
    i*k+k-1``). The prompt is left-padded: all rows share ``prompt_length`` (default: the input
    length at the first call). With ``max_new_tokens`` the processor is budget-aware: once the
    tokens left come within ``budget_horizon`` of what closing the answer needs, it only allows
    tokens after which the answer can still be closed in time.
    """

    def __init__(
        self,
        tokenizer: Any,
        requests: Sequence[IERequest],
        prompt_length: int | None = None,
        max_new_tokens: int | None = None,
        *,
        eos_token_ids: Iterable[int] | None = None,
        table: TokenTable | None = None,
        allow_leading_space: bool = False,
        budget_horizon: int = 32,
    ) -> None:
        if not requests:
            raise ValueError("no requests")
        self.table = table if table is not None else token_table(tokenizer)
        eos = list(eos_token_ids) if eos_token_ids is not None else list(self.table.eos_ids)
        if not eos:
            raise ValueError("the tokenizer has no EOS token: pass eos_token_ids")
        self.eos_ids = sorted(set(eos))
        self._eos_set = frozenset(self.eos_ids)
        pad = self.table.pad_id
        self._finished_ids = sorted(self._eos_set | ({pad} if pad is not None else set()))
        self.grammars = [ie_grammar(r, allow_leading_space=allow_leading_space) for r in requests]
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.budget_horizon = budget_horizon
        self._rows: list[_Row] | None = None
        self._consumed = 0
        self._history: torch.Tensor | None = None  # the generated tokens consumed so far
        self._const: dict[tuple[str, torch.device, int], torch.Tensor] = {}

    # -- state --------------------------------------------------------------------------------

    def reset(self) -> None:
        self._rows = None
        self._consumed = 0
        self._history = None

    def _start(self, batch: int) -> None:
        if batch % len(self.grammars):
            raise ValueError(f"batch of {batch} rows for {len(self.grammars)} requests")
        per_request = batch // len(self.grammars)
        self._rows = [_Row(self.grammars[r // per_request]) for r in range(batch)]
        self._consumed = 0
        self._history = None

    def _advance(self, row: _Row, token: int) -> None:
        if row.finished:
            return  # HF pads finished rows; nothing more belongs to the answer
        if token in self._eos_set:
            row.finished = True
            return
        data = self.table.token_bytes[token] if token < self.table.vocab_size else None
        if not data:
            row.finished = True  # a special token: the answer ends (and is completed) here
            return
        for byte in data:
            if not row.step(byte):  # forced past the mask (another processor): keep the valid prefix
                row.finished = True
                return

    def _catch_up(self, input_ids: torch.Tensor) -> int:
        """Advance every row by the tokens generated since the last call."""
        batch, length = input_ids.shape
        if self.prompt_length is None:
            self.prompt_length = length
        start = self.prompt_length
        generated = length - start
        if generated < 0:
            raise ValueError(f"input of length {length} is shorter than the prompt ({start})")
        if self._rows is None or len(self._rows) != batch or generated < self._consumed:
            self._start(batch)  # a new generation with this processor
        assert self._rows is not None
        if self._consumed and self._history is not None:
            # Rows keep their identity in greedy / sampled decoding; beam search reorders them.
            # A row whose past differs from what it consumed is re-parsed from its start.
            past = input_ids[:, start : start + self._consumed]
            moved = (past != self._history).any(dim=1)
            for index in moved.nonzero().flatten().tolist():
                row = self._rows[index] = _Row(self._rows[index].grammar)
                for token in input_ids[index, start : start + self._consumed].tolist():
                    self._advance(row, token)
        if generated > self._consumed:
            fresh = input_ids[:, start + self._consumed : length].tolist()
            for row, tokens in zip(self._rows, fresh, strict=True):
                for token in tokens:
                    self._advance(row, token)
            self._consumed = generated
        self._history = input_ids[:, start:length].clone()
        return generated

    # -- masking ------------------------------------------------------------------------------

    def _constant(self, name: str, ids: list[int], device: torch.device, vocab: int) -> torch.Tensor:
        key = (name, device, vocab)
        tensor = self._const.get(key)
        if tensor is None:
            tensor = self._const[key] = torch.tensor(
                [i for i in ids if i < vocab], dtype=torch.long, device=device
            )
        return tensor

    def _row_ids(self, row: _Row, generated: int, device: torch.device, vocab: int) -> torch.Tensor:
        if row.finished:
            return self._constant("finished", self._finished_ids, device, vocab)
        grammar, state = row.grammar, row.state
        if grammar.is_complete(state):
            return self._constant("eos", self.eos_ids, device, vocab)
        entry = grammar.allowed(state, self.table)
        if self.max_new_tokens is not None:
            left = self.max_new_tokens - generated - 1  # tokens after the one chosen now
            near_end = left < grammar.max_completion_bytes + self.budget_horizon
            if near_end and grammar.need_tokens(state, self.table) + self.budget_horizon > left:
                if entry.ranked_needs is None:
                    needs = [grammar.need_tokens(nxt, self.table) for nxt in entry.states]
                    order = sorted(range(len(needs)), key=needs.__getitem__)
                    entry.ranked_needs = [needs[i] for i in order]
                    entry.ranked_ids = [entry.ids[i] for i in order]
                cut = bisect.bisect_right(entry.ranked_needs, left)
                if cut == 0:  # follow the shortest completion (its tokens are all allowed)
                    forced = self.table.greedy_tokens(grammar.extension(state))
                    if forced:
                        return torch.tensor(forced[:1], dtype=torch.long, device=device)
                elif cut < len(entry.ranked_needs):
                    return entry.tensor(device, vocab, cut)
        if not entry:  # the vocabulary cannot continue: end here, finalize() completes
            return self._constant("eos", self.eos_ids, device, vocab)
        node = state[0]
        if (node in grammar.listed_spans and row.listed) or (node in grammar.relation_args and row.entities):
            narrowed = self._row_rules(row, entry, device, vocab)
            if narrowed is not None:
                return narrowed
        return entry.tensor(device, vocab)

    def _row_rules(self, row: _Row, entry: _Allowed, device: torch.device, vocab: int) -> torch.Tensor | None:
        """Rules that depend on what the row already wrote, so no grammar state can hold them:

        * a list names each mention once: a span already in its list may close again only while
          the text has more occurrences of it (``"Theatre"`` twice needs it twice in the text);
        * a relation's head and tail are spans of the answer's own entity block, so each carries
          its type (strict scoring needs it), and the tail is neither the head nor a tail the
          list already paired with this head (a repeated relation only adds a false positive).

        ``None`` (no narrowing) when a rule would leave no token: the grammar alone then rules.
        """
        grammar, state = row.grammar, row.state
        assert entry._span is not None  # span states keep their walk split in inside / crossing
        _, inside, crossing, _ = entry._span
        written = bytes(row.out[row.span_start :])
        escaped = bool(state[1] & 1)
        token_bytes = self.table.token_bytes
        # The tokens that close the span, with the span each closes.
        closed = [(t, written + _before_quote(token_bytes[t], escaped)) for t in crossing]
        if state[0] in grammar.listed_spans:
            spent = {span for span, n in row.listed.items() if n >= grammar.occurrences(span)}
            keep = [t for t, span in closed if span not in spent]
            if len(keep) == len(crossing) or not (keep or inside.ids):
                return None
            return torch.cat([inside.tensor(device, vocab), _id_tensor(keep, device, vocab)])
        # A relation argument: only the rest of an entity, then the quote.
        candidates = row.entities
        if state[0] not in grammar.relation_heads:
            candidates = candidates - {row.head} - {tail for head, tail in row.pairs if head == row.head}
        rests = {span[len(written) :] for span in candidates if span.startswith(written)}
        children, node_ids = self.table.children, self.table.node_ids
        ids: set[int] = set()
        for rest in rests:
            trie_node = 0
            for byte in rest:
                trie_node = children[trie_node].get(byte, -1)
                if trie_node < 0:
                    break
                ids.update(node_ids[trie_node])
        ids.update(t for t, span in closed if span in candidates)
        if not ids:
            return None
        return _id_tensor(sorted(ids), device, vocab)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = self._catch_up(input_ids)
        assert self._rows is not None
        vocab = scores.shape[-1]
        device = scores.device
        allowed = [self._row_ids(row, generated, device, vocab) for row in self._rows]
        out = torch.full_like(scores, float("-inf"))
        if len(allowed) == 1:
            out[0, allowed[0]] = scores[0, allowed[0]]
            return out
        # One scatter for the whole batch: -inf everywhere, the allowed scores copied back.
        cols = torch.cat(allowed)
        counts = torch.tensor([len(a) for a in allowed], device=device)
        rows = torch.repeat_interleave(torch.arange(len(allowed), device=device), counts)
        out[rows, cols] = scores[rows, cols]
        return out

    # -- results ------------------------------------------------------------------------------

    def row_complete(self) -> list[bool]:
        """Per row: whether the generated answer itself is complete (no completion needed)."""
        return [r.grammar.is_complete(r.state) for r in self._rows or []]

    def completed_texts(self) -> list[str]:
        """Per row: the answer so far, closed validly where generation stopped early."""
        if self._rows is None:
            return [_decode_answer(g.close_from(b"", g.initial, 0, g.initial)) for g in self.grammars]
        return [
            _decode_answer(r.grammar.close_from(bytes(r.out), r.state, r.safe_len, r.safe_state))
            for r in self._rows
        ]

    def finalize(self, sequences: torch.Tensor) -> list[str]:
        """The answer of each row of ``generate``'s output (its last token is never seen by
        ``__call__``), completed into valid JSON."""
        self._catch_up(sequences)
        return self.completed_texts()


# --------------------------------------------------------------------------------------------
# Repetition penalty

# Bytes that only shape the JSON (or separate words): never penalised.
_STRUCTURE_BYTES = frozenset(b'{}[]",: \t\n')


class AnswerRepetitionPenalty(LogitsProcessor):
    """``transformers``' repetition penalty restricted to what repeats in an IE answer: a token
    that carries text and that the answer already wrote scores ``s / penalty`` (``s * penalty``
    when negative).

    Unlike ``generate(repetition_penalty=...)`` it counts neither the prompt (an answer copies
    from it) nor tokens made only of JSON punctuation and spaces: ``]`` right after ``[`` is how
    the model says "none", and penalising it once used made greedy decoding open whichever list
    came next (every CoNLL04 relation went to the first relation type), and a penalised space
    kept spans to one word. ``prompt_length``: the padded prompt length (default: the input
    length at the first call).
    """

    def __init__(self, penalty: float, table: TokenTable, prompt_length: int | None = None) -> None:
        if penalty <= 0:
            raise ValueError(f"repetition penalty must be > 0, got {penalty}")
        self.penalty = penalty
        self.prompt_length = prompt_length
        self._text = torch.tensor(
            [bool(data) and any(b not in _STRUCTURE_BYTES for b in data) for data in table.token_bytes],
            dtype=torch.bool,
        )
        self._masks: dict[tuple[torch.device, int], torch.Tensor] = {}  # text-token mask per (device, vocab)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        answer = input_ids[:, self.prompt_length :]
        if self.penalty == 1.0 or answer.shape[1] == 0:
            return scores
        vocab = scores.shape[-1]
        text = self._masks.get((scores.device, vocab))
        if text is None:  # built once: the logits' width can exceed the tokenizer's (padded heads)
            text = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
            known = min(vocab, len(self._text))
            text[:known] = self._text[:known].to(scores.device)
            self._masks[(scores.device, vocab)] = text
        seen = torch.zeros_like(scores, dtype=torch.bool)
        seen.scatter_(1, answer.clamp(0, vocab - 1), True)
        seen &= text
        penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return torch.where(seen, penalised, scores)


# --------------------------------------------------------------------------------------------
# Generation helper


def constrained_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    requests: Sequence[IERequest],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    batch_size: int = 16,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    budget_aware: bool = True,
    add_special_tokens: bool = False,
    allow_leading_space: bool = False,
    repetition_penalty: float = 1.0,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate one constrained answer per prompt (valid JSON, grounded spans).

    ``prompts`` are full model inputs (e.g. a chat template rendered with the generation
    prompt); they are left-padded in batches of ``batch_size``. ``repetition_penalty`` is
    :class:`AnswerRepetitionPenalty`'s (1 = none).
    """
    if len(prompts) != len(requests):
        raise ValueError(f"{len(prompts)} prompts for {len(requests)} requests")
    table = token_table(tokenizer)
    eos = set(table.eos_ids) | set(_as_id_list(getattr(model.generation_config, "eos_token_id", None)))
    if not eos:
        raise ValueError("neither the tokenizer nor the model names an EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch_prompts = list(prompts[start : start + batch_size])
            batch_requests = list(requests[start : start + batch_size])
            encoded = tokenizer(
                batch_prompts,
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            ).to(device)
            processor = IEConstraintProcessor(
                tokenizer,
                batch_requests,
                prompt_length=encoded["input_ids"].shape[1],
                max_new_tokens=max_new_tokens if budget_aware else None,
                eos_token_ids=eos,
                table=table,
                allow_leading_space=allow_leading_space,
            )
            kwargs: dict[str, Any] = {
                "max_new_tokens": max_new_tokens,
                "do_sample": do_sample,
                "pad_token_id": pad_id,
                "eos_token_id": sorted(eos),
                "logits_processor": LogitsProcessorList(
                    [
                        *answer_penalty(repetition_penalty, table, encoded["input_ids"].shape[1]),
                        processor,
                    ]
                ),
            }
            if do_sample:
                kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
            kwargs.update(generate_kwargs)
            with torch.no_grad():
                sequences = model.generate(**encoded, **kwargs)
            answers.extend(processor.finalize(sequences))
    finally:
        tokenizer.padding_side = saved_side
        if saved_pad is None:
            tokenizer.pad_token = None
    return answers


def answer_penalty(penalty: float, table: TokenTable, prompt_length: int) -> list[LogitsProcessor]:
    """``[AnswerRepetitionPenalty]``, or ``[]`` for a penalty of 1 (none)."""
    return [] if penalty == 1.0 else [AnswerRepetitionPenalty(penalty, table, prompt_length)]
