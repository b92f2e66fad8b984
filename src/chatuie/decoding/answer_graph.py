"""The byte automaton of the answers one request allows (:class:`AnswerGraph`): its nodes,
built from the task's JSON format, the schema's labels and the text's spans, and stepping it
byte by byte. What decoding asks of it (completions, token masks) is :mod:`chatuie.decoding.grammar`."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from chatuie.data.records import IE_TASKS, Schema
from chatuie.decoding.masks import State
from chatuie.decoding.spans import (
    SPAN_BOUNDARIES,
    _AlignedSpans,
    _suffix_automaton,
    _utf8_tail,
    word_edges,
)

_LIT, _KEY, _SPAN, _DONE = 0, 1, 2, 3
_QUOTE, _BACKSLASH = 0x22, 0x5C


def _dedupe(labels: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(labels))


def _unescape(span: bytes) -> bytes:
    """Span bytes as written in the answer (``\\"``, ``\\\\``) -> the text's bytes."""
    return span.replace(b"\\\\", b"\x00").replace(b'\\"', b'"').replace(b"\x00", b"\\")


def _json_key(label: str) -> bytes:
    return json.dumps(label, ensure_ascii=False).encode("utf-8", "surrogatepass")


class AnswerGraph:
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
