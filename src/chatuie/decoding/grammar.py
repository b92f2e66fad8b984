"""The grammar of one request (:class:`IEGrammar`): its answer automaton
(:mod:`chatuie.decoding.answer_graph`) with what decoding asks of it, the shortest completions
and the tokens allowed in a state, and closing a partial answer."""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from chatuie.data.records import Schema
from chatuie.decoding.answer_graph import _BACKSLASH, _DONE, _KEY, _QUOTE, _SPAN, AnswerGraph
from chatuie.decoding.masks import State, _Allowed, _SpanWalk
from chatuie.decoding.tokens import TokenTable, clear_token_tables


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


@dataclass
class IERequest:
    """One row to constrain: the task, the input text and the labels it may use."""

    task: str
    text: str
    schema: Schema
    span_boundaries: str = "word"  # "word": spans never cut a word (see the module doc) | "char"


class IEGrammar(AnswerGraph):
    """The byte automaton of the answers allowed for one (task, text, schema), with its
    completions and token masks (each cached per grammar)."""

    def __init__(
        self,
        task: str,
        text: str,
        schema: Schema,
        *,
        allow_leading_space: bool = False,
        span_boundaries: str = "word",
    ) -> None:
        super().__init__(
            task, text, schema, allow_leading_space=allow_leading_space, span_boundaries=span_boundaries
        )
        self._span_walk_cache: dict[int, dict[int, _SpanWalk]] = {}
        self._allowed_cache: dict[int, dict[State, _Allowed]] = {}
        self._ext_cache: dict[State, bytes] = {}
        self._ext_active: set[State] = set()
        self._key_suffix_cache: dict[tuple[int, int], bytes | None] = {}
        self._need_cache: dict[tuple[Any, ...], int] = {}

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
        clear_token_tables()


def _decode_answer(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass").lstrip(" ")


def complete_answer(request: IERequest, partial: str | bytes) -> str:
    """Close a (possibly truncated or invalid) answer: parseable JSON, every span valid."""
    data = partial.encode("utf-8", "surrogatepass") if isinstance(partial, str) else partial
    return _decode_answer(ie_grammar(request).complete(data))
