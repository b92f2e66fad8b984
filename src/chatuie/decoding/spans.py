"""Where a span may lie in a text: word edges, aligned span ends and the text's suffix automaton."""

from __future__ import annotations

from chatuie.data.answers import is_word_char

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
