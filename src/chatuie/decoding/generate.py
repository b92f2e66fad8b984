"""The logits processor, the answer repetition penalty and the generation helper."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from chatuie.decoding.grammar import IEGrammar, IERequest, _before_quote, _decode_answer, ie_grammar
from chatuie.decoding.masks import _Allowed, _id_tensor
from chatuie.decoding.tokens import TokenTable, _as_id_list, token_table
from chatuie.progress import Progress


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

    def allowed_ids(
        self, input_ids: torch.Tensor, rows: Sequence[int] | None = None, *, vocab: int
    ) -> list[torch.Tensor]:
        """The token ids each row (of ``rows``, default all) may take next, given the sequences so
        far (prompt and answer, every row of the batch); ids of ``vocab`` or more are left out."""
        generated = self._catch_up(input_ids)
        assert self._rows is not None
        picked = self._rows if rows is None else [self._rows[i] for i in rows]
        return [self._row_ids(row, generated, input_ids.device, vocab) for row in picked]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed_ids(input_ids, vocab=scores.shape[-1])
        device = scores.device
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

    # -- per-row use (the continuous loop: rows join and leave at their own steps) ------------

    def start_rows(self) -> None:
        """One row per request, fed token by token through :meth:`advance_row`."""
        self._start(len(self.grammars))

    def advance_row(self, index: int, token: int) -> None:
        assert self._rows is not None, "start_rows() first"
        self._advance(self._rows[index], token)

    def row_allowed(self, index: int, generated: int, device: torch.device, vocab: int) -> torch.Tensor:
        """The token ids request ``index`` may take next, having written ``generated`` tokens."""
        assert self._rows is not None, "start_rows() first"
        return self._row_ids(self._rows[index], generated, device, vocab)

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

    def _text_mask(self, device: torch.device, vocab: int) -> torch.Tensor:
        text = self._masks.get((device, vocab))
        if text is None:  # built once: the logits' width can exceed the tokenizer's (padded heads)
            text = torch.zeros(vocab, dtype=torch.bool, device=device)
            known = min(vocab, len(self._text))
            text[:known] = self._text[:known].to(device)
            self._masks[(device, vocab)] = text
        return text

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        return self.on_answers(scores, None, input_ids[:, self.prompt_length :])

    def on_columns(
        self, scores: torch.Tensor, ids: torch.Tensor | None, sequences: torch.Tensor, rows: Sequence[int]
    ) -> torch.Tensor:
        """The same penalty where ``scores``' columns are the token ids ``ids`` (``None``: the
        whole vocabulary) and its rows are ``sequences[rows]`` (the decoding loop's view)."""
        if self.prompt_length is None:
            self.prompt_length = sequences.shape[1]
        return self.on_answers(scores, ids, sequences[list(rows), self.prompt_length :])

    def on_answers(
        self, scores: torch.Tensor, ids: torch.Tensor | None, answers: torch.Tensor
    ) -> torch.Tensor:
        """The penalty given each row's answer so far (token ids; -1 pads: nothing), where
        ``scores``' columns are the token ids ``ids`` (``None``: the whole vocabulary)."""
        if self.penalty == 1.0 or answers.shape[1] == 0:
            return scores
        written = answers >= 0
        if ids is None:
            vocab = scores.shape[-1]
            counts = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
            counts.scatter_add_(1, answers.clamp(0, vocab - 1), written.to(torch.int32))
            return self._penalise(scores, (counts > 0) & self._text_mask(scores.device, vocab))
        seen = ((answers[:, :, None] == ids[None, None, :]) & written[:, :, None]).any(dim=1)
        text = self._text_mask(scores.device, len(self._text))
        seen &= (ids < len(text)) & text[ids.clamp(max=len(text) - 1)]
        return self._penalise(scores, seen)

    def _penalise(self, scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return torch.where(seen, penalised, scores)


# --------------------------------------------------------------------------------------------
# Generation helper


ENGINES = ("chatuie", "transformers")


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
    engine: str = "chatuie",
    progress: Progress | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate one constrained answer per prompt (valid JSON, grounded spans).

    ``prompts`` are full model inputs (e.g. a chat template rendered with the generation
    prompt); they are left-padded in batches of ``batch_size``. ``repetition_penalty`` is
    :class:`AnswerRepetitionPenalty`'s (1 = none).

    ``engine="chatuie"`` decodes with :func:`chatuie.decoding.loop.decode` (the head over the
    allowed tokens only) where the model supports it, else, and with ``engine="transformers"``,
    with ``model.generate`` and the constraint as a logits processor (``generate_kwargs`` go
    there). ``progress`` counts prompts as their batches finish.
    """
    if len(prompts) != len(requests):
        raise ValueError(f"{len(prompts)} prompts for {len(requests)} requests")
    _check_engine(engine)
    from chatuie.decoding.continuous import decode_continuous
    from chatuie.decoding.loop import Sampler, supports_allowed_head

    use_loop = engine == "chatuie" and not generate_kwargs and supports_allowed_head(model)
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
        if use_loop and prompts:  # one continuous job: rows join as others finish
            processor = IEConstraintProcessor(
                tokenizer,
                requests,
                max_new_tokens=max_new_tokens if budget_aware else None,
                eos_token_ids=eos,
                table=table,
                allow_leading_space=allow_leading_space,
            )
            processor.start_rows()
            penalty = answer_penalty(repetition_penalty, table, 0)
            decode_continuous(
                model,
                _token_ids(tokenizer, prompts, add_special_tokens),
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                eos_ids=sorted(eos),
                pad_id=pad_id,
                sampler=Sampler(do_sample, temperature, top_k, top_p),
                rules=processor,
                adjust=penalty[0].on_answers if penalty else None,
                on_finished=progress.update if progress is not None else None,
            )
            return processor.completed_texts()
        for start, encoded in _encoded_batches(tokenizer, prompts, batch_size, add_special_tokens, device):
            batch_requests = list(requests[start : start + batch_size])
            prompt_length = encoded["input_ids"].shape[1]
            processor = IEConstraintProcessor(
                tokenizer,
                batch_requests,
                prompt_length=prompt_length,
                max_new_tokens=max_new_tokens if budget_aware else None,
                eos_token_ids=eos,
                table=table,
                allow_leading_space=allow_leading_space,
            )
            penalty = answer_penalty(repetition_penalty, table, prompt_length)
            kwargs: dict[str, Any] = {
                "max_new_tokens": max_new_tokens,
                "do_sample": do_sample,
                "pad_token_id": pad_id,
                "eos_token_id": sorted(eos),
                "logits_processor": LogitsProcessorList([*penalty, processor]),
            }
            if do_sample:
                kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
            kwargs.update(generate_kwargs)
            with torch.no_grad():
                sequences = model.generate(**encoded, **kwargs)
            answers.extend(processor.finalize(sequences))
            if progress is not None:
                progress.update(len(batch_requests))
    finally:
        tokenizer.padding_side = saved_side
        if saved_pad is None:
            tokenizer.pad_token = None
    return answers


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def _encoded_batches(
    tokenizer: Any, prompts: Sequence[str], batch_size: int, add_special_tokens: bool, device: Any
) -> Iterator[tuple[int, Any]]:
    """(start, the tokenized batch) for each batch of ``batch_size`` prompts, padded on the
    tokenizer's side (the callers set left)."""
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        yield (
            start,
            tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(
                device
            ),
        )


def _token_ids(tokenizer: Any, prompts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    """Each prompt's token ids, unpadded (the continuous loop pads the rows it stacks)."""
    return tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]


def free_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    *,
    repetition_penalty: float = 1.0,
    engine: str = "chatuie",
    add_special_tokens: bool = False,
    progress: Progress | None = None,
) -> list[str]:
    """Unconstrained greedy answers: the text each prompt is continued with (special tokens
    dropped), in left-padded batches of ``batch_size``, stopping at the model's EOS.

    ``engine="chatuie"`` runs the decoding loop (:func:`chatuie.decoding.loop.decode`) with the
    whole head: the KV cache growing in place, finished rows leaving the batch, a shared prompt
    beginning prefilled once; it gives ``generate``'s answers (greedy over the same scores), which
    runs instead for models the loop does not support and with ``engine="transformers"``.
    ``repetition_penalty`` is :class:`AnswerRepetitionPenalty`'s, as in the constrained mode.
    ``progress`` counts prompts as their batches finish.
    """
    _check_engine(engine)
    from chatuie.decoding.continuous import decode_continuous
    from chatuie.decoding.loop import Sampler, supports_allowed_head

    use_loop = engine == "chatuie" and supports_allowed_head(model)
    table = token_table(tokenizer)
    eos = _as_id_list(getattr(model.generation_config, "eos_token_id", None)) or list(table.eos_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    tokenizer.padding_side = "left"
    if use_loop:  # one continuous job: rows join as others finish
        penalty = answer_penalty(repetition_penalty, table, 0)
        answer_ids = decode_continuous(
            model,
            _token_ids(tokenizer, prompts, add_special_tokens),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            eos_ids=eos,
            pad_id=pad_id,
            sampler=Sampler(),
            adjust=penalty[0].on_answers if penalty else None,
            on_finished=progress.update if progress is not None else None,
        )
        return tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
    device = next(model.parameters()).device
    answers: list[str] = []
    for _, encoded in _encoded_batches(tokenizer, prompts, batch_size, add_special_tokens, device):
        prompt_length = encoded["input_ids"].shape[1]
        penalty = answer_penalty(repetition_penalty, table, prompt_length)
        with torch.no_grad():
            sequences = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                logits_processor=LogitsProcessorList(penalty),
            )
        answers.extend(tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True))
        if progress is not None:
            progress.update(len(encoded["input_ids"]))
    return answers


def answer_penalty(penalty: float, table: TokenTable, prompt_length: int) -> list[LogitsProcessor]:
    """``[AnswerRepetitionPenalty]``, or ``[]`` for a penalty of 1 (none)."""
    return [] if penalty == 1.0 else [AnswerRepetitionPenalty(penalty, table, prompt_length)]
