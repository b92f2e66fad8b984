"""Grammar-constrained decoding: the model can only write valid, grounded IE answers.

A :class:`IEConstraintProcessor` (a ``transformers`` ``LogitsProcessor``) masks, at every step and
for every row of a batch, the tokens that would leave the answer language of that row's request:

* compact JSON of the documented output format (:mod:`chatuie.data.answers`), no whitespace
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

from chatuie.decoding.generate import (
    AnswerRepetitionPenalty,
    IEConstraintProcessor,
    answer_penalty,
    constrained_generate,
    free_generate,
)
from chatuie.decoding.grammar import IEGrammar, IERequest, clear_caches, complete_answer, ie_grammar
from chatuie.decoding.spans import word_edges
from chatuie.decoding.tokens import TokenTable, token_table

__all__ = [
    "AnswerRepetitionPenalty",
    "IEConstraintProcessor",
    "IEGrammar",
    "IERequest",
    "TokenTable",
    "answer_penalty",
    "clear_caches",
    "complete_answer",
    "constrained_generate",
    "free_generate",
    "ie_grammar",
    "token_table",
    "word_edges",
]
