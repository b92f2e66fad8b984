"""The generation constraint: grammar on bytes, token-trie walk, processor, end-to-end sampling.

Tokenizers and models are tiny and built here (no hub): a GPT-2 style byte-level BPE and a
sentencepiece-like BPE (Metaspace, ``<0x..>`` byte fallback), each under a random Llama.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from chatuie.data.answers import ground
from chatuie.data.records import Schema
from chatuie.decoding import (
    AnswerRepetitionPenalty,
    IEConstraintProcessor,
    IEGrammar,
    IERequest,
    TokenTable,
    complete_answer,
    constrained_generate,
    token_table,
    word_edges,
)

# JSON punctuation next to words, so merges straddle span edges (e.g. '":["John').
CORPUS = [
    '{"PER":["张三"],"ORG":[]} Hello world, "quoted" text.',
    '{"entities":{"Peop":["John"],"Org":["IBM"]},"relations":{"Work_For":[{"head":"John","tail":"IBM"}]}}',
    '{"质押":[{"trigger":"质押","arguments":{"sub-org":["东方金钰"],"date":[]}}]}',
    '北京是中国的首都。张三在北京工作。 back\\slash and "quotes" here',
    "John Smith works for IBM in New York. Beijing is the capital.",
] * 3


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def _sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    # A small alphabet: most Chinese characters must go through <0x..> byte pieces.
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, limit_alphabet=60)
    trained.train_from_iterator(CORPUS, trainer)
    config = json.loads(trained.to_str())["model"]
    # Like Llama: the byte pieces are ordinary vocabulary entries of the BPE model.
    vocab: dict[str, int] = {}
    for piece in specials + [f"<0x{i:02X}>" for i in range(256)]:
        vocab[piece] = len(vocab)
    for piece, _ in sorted(config["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in config["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
    )


def _tiny_llama(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, init_scale: float = 0.02
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        initializer_range=init_scale,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece_like"])
def tokenizer_and_model(request: pytest.FixtureRequest):
    build = _byte_level_tokenizer if request.param == "byte_level" else _sentencepiece_like_tokenizer
    tokenizer = build()
    return tokenizer, _tiny_llama(tokenizer)


NER = Schema(entities=["PER", "LOC"])
RE = Schema(entities=["Peop", "Org"], relations=["Work_For", "Live_In"])
RE_LOC = Schema(entities=["Peop", "Org", "Loc"], relations=["Work_For", "Live_In"])
EE = Schema(events={"质押": ["sub-org", "date"], "收购": ["obj"]})
TEXT = '张三在北京说"你好" John works for IBM\\x.\n李四'


def _grammar(task: str, text: str = TEXT, schema: Schema | None = None) -> IEGrammar:
    return IEGrammar(task, text, schema or {"ner": NER, "re": RE, "ee": EE}[task])


# --------------------------------------------------------------------------------------------
# The grammar on bytes


@pytest.mark.parametrize(
    ("task", "answer", "ok"),
    [
        ("ner", '{"PER":[],"LOC":[]}', True),
        ("ner", '{"PER":["张三"],"LOC":[]}', True),
        ("ner", '{"PER":["John"],"LOC":["北京","在"]}', True),
        ("ner", '{"PER":["说\\"你"],"LOC":[]}', True),  # text '"' escaped, one character of the text
        ("ner", '{"PER":["IBM\\\\x"],"LOC":[]}', True),  # text '\' escaped
        ("ner", '{"PER":["李四"],"LOC":[]}', True),
        ("ner", '{"PER":["x.\\n李"],"LOC":[]}', False),  # control characters cannot be spanned
        ("ner", '{"PER":["说"你"],"LOC":[]}', False),  # an unescaped quote closes the span
        ("ner", '{"PER":["\\u5f20"],"LOC":[]}', False),  # only \" and \\ escapes
        ("ner", '{"PER":[""],"LOC":[]}', False),  # spans are non-empty
        ("ner", '{"PER":["张四"],"LOC":[]}', False),  # not a substring
        ("ner", "{}", False),  # every label is listed ...
        ("ner", '{"PER":[]}', False),
        ("ner", '{"LOC":[],"PER":[]}', False),  # ... in the schema's order
        ("ner", '{"PER":[],"ORG":[]}', False),  # not in the schema
        ("ner", '{"PER":[],"PER":[],"LOC":[]}', False),  # a key once
        ("ner", '{ "PER":[],"LOC":[]}', False),  # compact: no whitespace outside strings
        ("ner", '{"PER":[],"LOC":[] }', False),
        ("ner", '{"PER":["张三",],"LOC":[]}', False),
        ("ner", '{"PER":["张三"],"LOC":[]', False),  # incomplete
        ("re", '{"entities":{"Peop":[],"Org":[]},"relations":{"Work_For":[],"Live_In":[]}}', True),
        (
            "re",
            '{"entities":{"Peop":["John"],"Org":["IBM"]},'
            '"relations":{"Work_For":[{"head":"John","tail":"IBM"}],"Live_In":[]}}',
            True,
        ),
        ("re", '{"entities":{},"relations":{}}', False),
        ("re", '{"entities":{"Peop":[],"Org":[]},"relations":{"Live_In":[],"Work_For":[]}}', False),
        ("re", '{"entities":{"Peop":[],"Work_For":[]},"relations":{"Work_For":[],"Live_In":[]}}', False),
        (
            "re",
            '{"entities":{"Peop":[],"Org":[]},"relations":{"Work_For":[{"head":"John"}],"Live_In":[]}}',
            False,
        ),
        ("re", '{"relations":{"Work_For":[],"Live_In":[]},"entities":{"Peop":[],"Org":[]}}', False),
        ("ee", '{"质押":[],"收购":[]}', True),
        ("ee", '{"质押":[{"trigger":"说","arguments":{"sub-org":["张三"],"date":[]}}],"收购":[]}', True),
        ("ee", '{"质押":[],"收购":[{"trigger":"北京","arguments":{}}]}', True),
        ("ee", "{}", False),
        ("ee", '{"质押":[{"trigger":"说","arguments":{"obj":["张三"]}}],"收购":[]}', False),  # wrong role
        ("ee", '{"质押":[{"trigger":"说","arguments":{"date":[],"date":[]}}],"收购":[]}', False),
        # Roles are optional but come in the event type's order.
        ("ee", '{"质押":[{"trigger":"说","arguments":{"date":[],"sub-org":["张三"]}}],"收购":[]}', False),
        ("ee", '{"质押":[{"trigger":"","arguments":{}}],"收购":[]}', False),
        ("ee", '{"质押":[{"arguments":{},"trigger":"说"}],"收购":[]}', False),
    ],
)
def test_grammar_accepts_exactly_the_format(task: str, answer: str, ok: bool) -> None:
    assert _grammar(task).accepts(answer.encode()) is ok
    if ok:
        assert ground(task, answer, TEXT, _grammar(task).schema)["dropped"] == 0


def test_spans_close_only_on_whole_characters() -> None:
    grammar = _grammar("ner")
    zhang = "张".encode()
    state = grammar.advance(grammar.initial, b'{"PER":["' + zhang[:2])
    assert state is not None
    assert grammar.step(state, ord('"')) is None  # mid-character
    assert grammar.advance(state, zhang[2:] + b'"],"LOC":[]}') is not None
    # A span cannot start with a continuation byte even where those bytes occur in the text.
    assert grammar.advance(grammar.initial, b'{"PER":["' + zhang[1:]) is None


def test_keys_with_quotes_and_non_ascii_are_json_escaped() -> None:
    schema = Schema(entities=['say"q', "a\\b", "人物"])
    grammar = IEGrammar("ner", "abc", schema, span_boundaries="char")
    answer = json.dumps(
        {'say"q': ["a"], "a\\b": [], "人物": ["bc"]}, ensure_ascii=False, separators=(",", ":")
    )
    assert grammar.accepts(answer.encode())
    assert not grammar.accepts(b'{"say"q":[]}')


def test_text_without_spannable_characters_allows_only_empty_lists() -> None:
    for text in ["", "\n\t\n"]:
        ner = IEGrammar("ner", text, NER)
        assert ner.accepts(b'{"PER":[],"LOC":[]}')
        assert ner.transitions(ner.advance(ner.initial, b'{"PER":[')).keys() == {ord("]")}
        re_ = IEGrammar("re", text, RE)
        state = re_.advance(re_.initial, b'{"entities":{"Peop":[],"Org":[]},"relations":{"Work_For":[')
        assert set(re_.transitions(state)) == {ord("]")}
        ee = IEGrammar("ee", text, EE)
        state = ee.advance(ee.initial, '{"质押":['.encode())
        assert set(ee.transitions(state)) == {ord("]")}


def test_keys_follow_the_schema_order() -> None:
    grammar = IEGrammar("ner", "abc", Schema(entities=["A", "B"]))
    assert set(grammar.transitions(grammar.initial)) == {ord("{")}
    state = grammar.advance(grammar.initial, b"{")
    assert set(grammar.transitions(state)) == {ord('"')}
    state = grammar.advance(grammar.initial, b'{"A":[]')
    assert set(grammar.transitions(state)) == {ord(",")}  # "B" must follow
    state = grammar.advance(grammar.initial, b'{"A":[],"B":[]')
    assert set(grammar.transitions(state)) == {ord("}")}
    # An empty schema asks for nothing: "{}".
    assert IEGrammar("ner", "abc", Schema(entities=[])).accepts(b"{}")


def test_leading_space_option() -> None:
    empty = b'{"PER":[],"LOC":[]}'
    assert not _grammar("ner").accepts(b" " + empty)
    grammar = IEGrammar("ner", TEXT, NER, allow_leading_space=True)
    assert grammar.accepts(b" " + empty) and grammar.accepts(empty)
    assert not grammar.accepts(b"  " + empty)


@pytest.mark.parametrize(
    ("task", "partial", "expected"),
    [
        ("ner", "", '{"PER":[],"LOC":[]}'),
        ("ner", '{"PER":["张', '{"PER":["张"],"LOC":[]}'),  # a valid span is closed where it stands
        ("ner", '{"PER":["张三","', '{"PER":["张三"],"LOC":[]}'),  # an empty span is dropped
        ("ner", '{"PER":["张三","说\\', '{"PER":["张三"],"LOC":[]}'),  # so is an open escape
        ("ner", '{"PER":["张三"],"LO', '{"PER":["张三"],"LOC":[]}'),  # a partial key is finished
        ("ner", '{"PER":["张三"],"LOC":["北京"]}', '{"PER":["张三"],"LOC":["北京"]}'),
        ("ner", '{"PER":["张三"],"LOC":[]} trailing', '{"PER":["张三"],"LOC":[]}'),
        ("ner", '{"PER":["张三X"]}', '{"PER":["张三"],"LOC":[]}'),  # cut at the first invalid byte
        # A word cut in half is no span (with word boundaries, the default).
        ("ner", '{"PER":["张三"],"LOC":["IB', '{"PER":["张三"],"LOC":[]}'),
        (
            "re",
            '{"entities":{"Peop":["John"]',
            '{"entities":{"Peop":["John"],"Org":[]},"relations":{"Work_For":[],"Live_In":[]}}',
        ),
        (
            "re",
            '{"entities":{"Peop":[],"Org":[]},"relations":{"Work_For":[{"head":"John","tail":"I',
            '{"entities":{"Peop":[],"Org":[]},"relations":{"Work_For":[{"head":"John","tail":"I"}],'
            '"Live_In":[]}}',
        ),
        (
            "re",
            '{"entities":{"Peop":[],"Org":[]},"relations":{"Work_For":[{"head":"Jo',
            '{"entities":{"Peop":[],"Org":[]},"relations":{"Work_For":[],"Live_In":[]}}',
        ),
        ("ee", '{"质押":[{"trigger":"说', '{"质押":[{"trigger":"说","arguments":{}}],"收购":[]}'),
        (
            "ee",
            '{"质押":[{"trigger":"说","arguments":{"sub-org":["张三"],"da',
            '{"质押":[{"trigger":"说","arguments":{"sub-org":["张三"]}}],"收购":[]}',
        ),
    ],
)
def test_completion_of_truncated_answers(task: str, partial: str, expected: str) -> None:
    schema = {"ner": NER, "re": RE, "ee": EE}[task]
    request = IERequest(task, TEXT, schema)
    if '"I"' in expected:  # "I" of "IBM": a span only with character boundaries
        assert complete_answer(request, partial) == expected.replace('{"head":"John","tail":"I"}', "")
        request = IERequest(task, TEXT, schema, span_boundaries="char")
    assert complete_answer(request, partial) == expected
    assert ground(task, expected, TEXT, schema)["dropped"] == 0


def test_completion_of_a_character_cut_in_half() -> None:
    request = IERequest("ner", TEXT, NER)
    assert complete_answer(request, '{"PER":["张三"],"LOC":["北'.encode()[:-1]) == '{"PER":["张三"],"LOC":[]}'


@given(st.sampled_from(["ner", "re", "ee"]), st.binary(max_size=80), st.integers(0, 80))
@settings(max_examples=300, deadline=None, database=None)
def test_completion_always_parses(task: str, noise: bytes, cut: int) -> None:
    schema = {"ner": NER, "re": RE, "ee": EE}[task]
    grammar = _grammar(task)
    # Walk a random valid path (driven by ``noise``), cut it anywhere, complete it.
    state, out = grammar.initial, bytearray()
    for byte in noise:
        moves = grammar.transitions(state)
        if not moves:
            break
        choice = sorted(moves)[byte % len(moves)]
        state = moves[choice]
        out.append(choice)
    answer = complete_answer(IERequest(task, TEXT, schema), bytes(out[:cut]))
    assert grammar.accepts(answer.encode())
    assert ground(task, answer, TEXT, schema)["dropped"] == 0
    # The inventive completion used by the budget also always ends in a complete answer.
    extension = grammar.extension(state)
    assert grammar.accepts(bytes(out) + extension)
    assert len(extension) <= grammar.max_completion_bytes


# --------------------------------------------------------------------------------------------
# Token table and trie walk


def test_token_bytes_match_the_tokenizer(tokenizer_and_model) -> None:
    tokenizer, _ = tokenizer_and_model
    table = token_table(tokenizer)
    assert token_table(tokenizer) is table  # cached per tokenizer
    assert table.eos_ids == (tokenizer.eos_token_id,)
    for text in ['{"PER":["张三"]}', '北京 is 首都, 龘 "q" a\\b', "John Smith  works"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        decoded = table.decode(ids).decode("utf-8")
        assert decoded.lstrip(" ") == text  # Metaspace adds one leading "▁"
    if "▁" in "".join(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        assert table.token_bytes[tokenizer.convert_tokens_to_ids("<0xE4>")] == b"\xe4"


def _brute_force_allowed(grammar: IEGrammar, state, table: TokenTable) -> set[int]:
    return {
        t for t, data in enumerate(table.token_bytes) if data and grammar.advance(state, data) is not None
    }


@given(st.sampled_from(["ner", "re", "ee"]), st.binary(min_size=0, max_size=60))
@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_trie_walk_equals_brute_force(tokenizer_and_model, task: str, noise: bytes) -> None:
    tokenizer, _ = tokenizer_and_model
    table = token_table(tokenizer)
    grammar = _grammar(task)
    state = grammar.initial
    for byte in noise:
        moves = grammar.transitions(state)
        if not moves:
            break
        state = moves[sorted(moves)[byte % len(moves)]]
    entry = grammar.allowed(state, table)
    assert set(entry.ids) == _brute_force_allowed(grammar, state, table)
    for token, after in zip(entry.ids, entry.states, strict=True):
        assert grammar.advance(state, table.token_bytes[token]) == after


def test_straddling_and_byte_tokens_on_a_handmade_vocabulary() -> None:
    pieces = [
        None,
        b"{",
        b'"',
        b"}",
        b"]",
        b'"]',
        b'"]}',
        b"Bei",
        b"ji",
        b"ng",
        b'ng"]',
        b'ng"]}',
        b'{"LOC":["',
        b" Bei",
        b"\xe5",
        b"\x8c",
        b"\x97",
        "北".encode(),
        b"\\",
        b'\\"',
        b'"LOC',
        b'":[',
    ]
    table = TokenTable(pieces, eos_ids=[0])
    text = 'Beijing 北京 say "hi" in Beijing'
    grammar = IEGrammar("ner", text, Schema(entities=["LOC"]), span_boundaries="char")
    ids = lambda state: {pieces[t] for t in grammar.allowed(state, table).ids}  # noqa: E731
    assert ids(grammar.initial) == {b"{", b'{"LOC":["'}
    in_span = grammar.advance(grammar.initial, b'{"LOC":["Beiji')
    assert {b'ng"]', b'ng"]}', b"ng"} <= ids(in_span)
    assert b'"]' in ids(in_span) and b"Bei" not in ids(in_span)
    start = grammar.advance(grammar.initial, b'{"LOC":["')
    assert {b"Bei", b"\xe5", "北".encode(), b" Bei", b'\\"'} <= ids(start)
    assert b'"' not in ids(start)  # empty span
    assert b"\x8c" not in ids(start)  # a span cannot start mid-character
    mid_char = grammar.advance(start, b"\xe5")
    assert ids(mid_char) == {b"\x8c"}  # only the continuation byte of 北
    assert grammar.advance(grammar.initial, b'{"LOC":["say \\"hi\\""]}') is not None
    done = grammar.advance(grammar.initial, b'{"LOC":["ng"]}')
    assert grammar.is_complete(done) and ids(done) == set()
    # With word boundaries (the default) "Beiji" may only go on, " Bei" may not start a span.
    words = IEGrammar("ner", text, Schema(entities=["LOC"]))
    in_word = words.advance(words.initial, b'{"LOC":["Beiji')
    allowed = {pieces[t] for t in words.allowed(in_word, table).ids}
    assert {b'ng"]', b'ng"]}', b"ng"} <= allowed and b'"]' not in allowed
    start = words.advance(words.initial, b'{"LOC":["')
    assert {b"Bei", "北".encode()} <= {pieces[t] for t in words.allowed(start, table).ids}
    assert b" Bei" not in {pieces[t] for t in words.allowed(start, table).ids}


@pytest.mark.parametrize(
    ("span", "ok"),
    [
        ("John Smith", True),
        ("Smith", True),
        ("Smith,", True),
        ("Mon.", True),
        ("on", True),  # the last word (it is also inside "Mon")
        ("2007年12月", True),
        ("年", True),  # CJK characters are words of their own
        ("12月 in", True),
        ("Smi", False),
        ("mith", False),
        ("007", False),
        (" Smith", False),
        ("John ", False),
        ("n S", False),
        ("Mo", False),
    ],
)
def test_word_boundaries(span: str, ok: bool) -> None:
    text = "John Smith, 2007年12月 in Mon. on"
    answer = json.dumps({"LOC": [span]}, ensure_ascii=False, separators=(",", ":")).encode()
    assert IEGrammar("ner", text, Schema(entities=["LOC"])).accepts(answer) is ok
    assert IEGrammar("ner", text, Schema(entities=["LOC"]), span_boundaries="char").accepts(answer)


@pytest.mark.parametrize("text", [": ", "a: \n", "北京 "])
def test_word_spans_never_enter_a_state_that_cannot_close(text: str) -> None:
    # Found by the property test: after ":" the span could take the text's final space, a state
    # with no way to close (spans never end on a space), and completing the answer then failed.
    grammar = IEGrammar("ner", text, Schema(entities=["PER"]))
    seen, stack = set(), [grammar.initial]
    while stack:
        state = stack.pop()
        if state in seen:
            continue
        seen.add(state)
        assert grammar.is_complete(state) or grammar.extension(state) is not None
        stack.extend(grammar.transitions(state).values())
    if text.startswith(":"):
        assert grammar.complete(b'{"PER":[":') == b'{"PER":[":"]}'


def test_unknown_span_boundaries_are_refused() -> None:
    with pytest.raises(ValueError, match="span_boundaries"):
        IEGrammar("ner", "abc", NER, span_boundaries="token")


def _word_aligned(span: str, text: str) -> bool:
    """Some occurrence of ``span`` starts and ends on word edges."""
    starts, ends = word_edges(text)
    data, piece = text.encode("utf-8", "surrogatepass"), span.encode("utf-8", "surrogatepass")
    found = data.find(piece)
    while found >= 0:
        if found in starts and found + len(piece) in ends:
            return True
        found = data.find(piece, found + 1)
    return False


# --------------------------------------------------------------------------------------------
# The processor


def _step_scores(processor: IEConstraintProcessor, ids: list[list[int]], vocab: int) -> torch.Tensor:
    return processor(torch.tensor(ids), torch.zeros(len(ids), vocab))


def test_eos_only_when_complete(tokenizer_and_model) -> None:
    tokenizer, _ = tokenizer_and_model
    table = token_table(tokenizer)
    eos = tokenizer.eos_token_id
    request = IERequest("ner", "John lives in Beijing", NER)
    processor = IEConstraintProcessor(tokenizer, [request])
    answer_ids = table.greedy_tokens(b'{"PER":["John"],"LOC":[]}')
    prompt = [5, 6, 7]
    vocab = len(tokenizer) + 3  # models often have padded embedding rows
    for k in range(len(answer_ids) + 2):
        sequence = prompt + answer_ids[:k] if k <= len(answer_ids) else prompt + answer_ids + [eos]
        scores = _step_scores(processor, [sequence], vocab)
        allowed = set(torch.isfinite(scores[0]).nonzero().flatten().tolist())
        if k < len(answer_ids):
            assert eos not in allowed and answer_ids[k] in allowed
            assert max(allowed) < len(tokenizer)
        else:
            assert allowed <= {eos, tokenizer.pad_token_id} and eos in allowed
    assert processor.completed_texts() == ['{"PER":["John"],"LOC":[]}']


def test_leading_space_is_allowed_on_request_and_stripped(tokenizer_and_model) -> None:
    tokenizer, _ = tokenizer_and_model
    table = token_table(tokenizer)
    answer = table.greedy_tokens(b' {"PER":["John"],"LOC":[]}')
    request = IERequest("ner", "John", NER)
    strict = IEConstraintProcessor(tokenizer, [request])
    scores = _step_scores(strict, [[1]], len(tokenizer))
    assert not torch.isfinite(scores[0, answer[0]])  # " " or "▁{" cannot start the answer
    lenient = IEConstraintProcessor(tokenizer, [request], allow_leading_space=True)
    scores = _step_scores(lenient, [[1]], len(tokenizer))
    assert torch.isfinite(scores[0, answer[0]])
    assert lenient.finalize(torch.tensor([[1, *answer]])) == ['{"PER":["John"],"LOC":[]}']


def test_processor_batches_rows_independently(tokenizer_and_model) -> None:
    tokenizer, _ = tokenizer_and_model
    table = token_table(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    requests = [IERequest("ner", "John", NER), IERequest("ee", "质押", EE)]
    processor = IEConstraintProcessor(tokenizer, requests, prompt_length=2)
    short = table.greedy_tokens(b'{"PER":[],"LOC":[]}') + [eos]
    long = table.greedy_tokens('{"质押":[{"trigger":"质押","arguments":{"sub-org":["质押"],"'.encode())
    width = max(len(short), len(long))
    rows = [
        [pad, 1, *short, *[pad] * (width - len(short))],
        [1, 1, *long, *[pad] * (width - len(long))],
    ]
    assert len(long) >= len(short)
    scores = _step_scores(processor, rows, len(tokenizer))
    finite = [set(torch.isfinite(scores[r]).nonzero().flatten().tolist()) for r in range(2)]
    assert finite[0] == {eos, pad}  # a finished row only gets EOS / pad
    assert eos not in finite[1] and table.greedy_tokens(b"date")[0] in finite[1]
    assert processor.completed_texts() == [
        '{"PER":[],"LOC":[]}',
        '{"质押":[{"trigger":"质押","arguments":{"sub-org":["质押"]}}],"收购":[]}',
    ]


def _allowed_after(tokenizer, request: IERequest, prefix: str) -> list[bytes]:
    """The bytes of every token the processor allows after ``prefix`` of the answer."""
    table = token_table(tokenizer)
    processor = IEConstraintProcessor(tokenizer, [request], prompt_length=1)
    ids = [1, *table.greedy_tokens(prefix.encode())]
    scores = _step_scores(processor, [ids], len(tokenizer))
    assert processor.completed_texts()[0].startswith(prefix.split(',"')[0])  # the prefix was consumed
    return [table.token_bytes[t] for t in torch.isfinite(scores[0]).nonzero().flatten().tolist()]


def test_a_list_names_a_mention_once_per_occurrence(tokenizer_and_model) -> None:
    tokenizer, _ = tokenizer_and_model
    schema = Schema(entities=["PER"])
    closes = lambda allowed: any(t.startswith(b'"') for t in allowed)  # noqa: E731
    # "John met ...": a repeated "John" may still grow into "John met", so closing it is banned.
    once = IERequest("ner", "John met Mary there", schema)
    assert closes(_allowed_after(tokenizer, once, '{"PER":["John'))
    assert not closes(_allowed_after(tokenizer, once, '{"PER":["John","John'))  # John occurs once
    assert closes(_allowed_after(tokenizer, once, '{"PER":["John","Mary'))
    twice = IERequest("ner", "John met John there", schema)
    assert closes(_allowed_after(tokenizer, twice, '{"PER":["John","John'))
    assert not closes(_allowed_after(tokenizer, twice, '{"PER":["John","John","John'))
    # A repeat that cannot grow (the text ends) is let through rather than leave no token.
    assert closes(
        _allowed_after(tokenizer, IERequest("ner", "Mary met John", schema), '{"PER":["John","John')
    )
    # Another list starts afresh.
    two_labels = IERequest("ner", "John met Mary there", Schema(entities=["PER", "LOC"]))
    assert closes(_allowed_after(tokenizer, two_labels, '{"PER":["John"],"LOC":["John'))


def test_occurrences_count_spans_as_written_in_the_answer() -> None:
    grammar = IEGrammar("ner", 'say "hi" \\ and "hi" \\', NER, span_boundaries="char")
    assert grammar.occurrences(b'\\"hi\\"') == 2  # written with escaped quotes
    assert grammar.occurrences(b"\\\\") == 2  # an escaped backslash
    assert grammar.occurrences(b"hi") == 2 and grammar.occurrences(b"ho") == 0


def test_relation_arguments_are_entities_of_the_answer(tokenizer_and_model) -> None:
    tokenizer, _ = tokenizer_and_model
    request = IERequest("re", "John works for IBM in Paris", RE)
    request_loc = IERequest("re", "John works for IBM in Paris", RE_LOC)
    entities = '{"entities":{"Peop":["John"],"Org":["IBM"]},"relations":{"Work_For":[{"head":"'

    def fits(allowed: list[bytes], spans: set[bytes]) -> bool:
        for token in allowed:
            before = token.split(b'"')[0]
            if not any(s.startswith(before) and (b'"' not in token or before == s) for s in spans):
                return False
        return bool(allowed)

    assert fits(_allowed_after(tokenizer, request, entities), {b"John", b"IBM"})
    assert fits(_allowed_after(tokenizer, request, entities + "J"), {b"ohn"})
    # The tail is another entity than the head.
    assert fits(_allowed_after(tokenizer, request, entities + 'John","tail":"'), {b"IBM"})
    # A list names a head/tail pair once: with John and IBM paired, John's tail can only be Paris.
    three = '{"entities":{"Peop":["John"],"Org":["IBM"],"Loc":["Paris"]},"relations":{"Work_For":['
    paired = three + '{"head":"John","tail":"IBM"},{"head":"John","tail":"'
    assert fits(_allowed_after(tokenizer, request_loc, paired), {b"Paris"})
    # ... IBM's tail is still free, and another list starts afresh.
    assert fits(
        _allowed_after(tokenizer, request_loc, three + '{"head":"John","tail":"IBM"},{"head":"IBM","tail":"'),
        {b"John", b"Paris"},
    )
    fresh = three + '{"head":"John","tail":"IBM"}],"Live_In":[{"head":"John","tail":"'
    assert fits(_allowed_after(tokenizer, request_loc, fresh), {b"IBM", b"Paris"})
    # No entities listed: nothing to choose from, the grammar alone rules (any substring).
    bare = '{"entities":{"Peop":[],"Org":[]},"relations":{"Work_For":[{"head":"'
    assert not fits(_allowed_after(tokenizer, request, bare), {b"John", b"IBM"})


def test_num_return_sequences_rows_share_a_request(tokenizer_and_model) -> None:
    tokenizer, model = tokenizer_and_model
    request = IERequest("ner", "John lives in Beijing", NER)
    processor = IEConstraintProcessor(tokenizer, [request], max_new_tokens=30)
    encoded = tokenizer(["Extract: John lives in Beijing"], return_tensors="pt")
    torch.manual_seed(1)
    out = model.generate(
        **encoded,
        max_new_tokens=30,
        do_sample=True,
        top_k=0,
        num_return_sequences=3,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=[processor],
    )
    texts = processor.finalize(out)
    assert len(texts) == 3
    assert all(ground("ner", t, request.text, NER)["dropped"] == 0 for t in texts)


def test_beam_search_rows_are_resynchronised(tokenizer_and_model) -> None:
    tokenizer, model = tokenizer_and_model
    text = 'John works for IBM, 张三在北京说"你好"'
    requests = [IERequest("re", text, RE), IERequest("ee", text, EE)]
    encoded = tokenizer(
        [f"{r.task}: {text}" for r in requests],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    processor = IEConstraintProcessor(tokenizer, requests, max_new_tokens=60)
    out = model.generate(
        **encoded,
        max_new_tokens=60,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=[processor],
    )
    texts = processor.finalize(out)
    assert len(texts) == 4
    assert all(processor.row_complete())  # the beams were masked with their own states
    for index, answer in enumerate(texts):
        request = requests[index // 2]
        _check_answer(request.task, answer, text, request.schema)


def test_budget_aware_generation_completes_by_itself(tokenizer_and_model) -> None:
    tokenizer, model = tokenizer_and_model
    text = '张三在北京说"你好" John works for IBM'
    requests = [
        IERequest("ner", text, NER),
        IERequest("re", text, RE),
        IERequest("ee", text, EE),
    ] * 2
    prompts = [f"{r.task}: {text}" for r in requests]
    table = token_table(tokenizer)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    processor = IEConstraintProcessor(tokenizer, requests, max_new_tokens=40, eos_token_ids=table.eos_ids)
    torch.manual_seed(3)
    out = model.generate(
        **encoded,
        max_new_tokens=40,
        do_sample=True,
        top_k=0,
        temperature=1.0,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=[processor],
    )
    texts = processor.finalize(out)
    assert all(processor.row_complete())  # no completion was needed
    for request, answer in zip(requests, texts, strict=True):
        assert ground(request.task, answer, text, request.schema)["dropped"] == 0


# --------------------------------------------------------------------------------------------
# End to end: a random model sampling at temperature 1 always yields valid, grounded answers

CHARS = list('张三李四北京中国的是在说你好质押收购 abcJohnIBMx"\\,.:{}[]\n')
ENTITY_LABELS = ["PER", "LOC", "ORG", "人物", 'say"q', "a\\b"]
RELATION_LABELS = ["Work_For", "Live_In", "位于"]
EVENT_ROLES = {"质押": ["sub-org", "date", "obj"], "收购": ["obj", "sub"], 'E"x': ["r\\1"]}


@st.composite
def schemas(draw: st.DrawFn) -> tuple[Schema, Schema, Schema]:
    entities = draw(st.lists(st.sampled_from(ENTITY_LABELS), max_size=4, unique=True))
    relations = draw(st.lists(st.sampled_from(RELATION_LABELS), max_size=3, unique=True))
    events = draw(st.lists(st.sampled_from(sorted(EVENT_ROLES)), max_size=3, unique=True))
    roles = {e: draw(st.lists(st.sampled_from(EVENT_ROLES[e]), max_size=3, unique=True)) for e in events}
    return (
        Schema(entities=entities),
        Schema(entities=entities, relations=relations),
        Schema(events=roles),
    )


def _check_answer(task: str, answer: str, text: str, schema: Schema, boundaries: str = "char") -> None:
    data = json.loads(answer)
    assert answer == json.dumps(data, ensure_ascii=False, separators=(",", ":"))  # compact

    def spans(values: object) -> None:
        assert isinstance(values, list)
        for span in values:
            assert isinstance(span, str) and span and span in text
            assert boundaries == "char" or _word_aligned(span, text), span

    def entity_object(obj: object) -> None:
        assert isinstance(obj, dict)
        assert list(obj) == list(dict.fromkeys(schema.entities))  # every label, in order
        for values in obj.values():
            spans(values)

    if task == "ner":
        entity_object(data)
    elif task == "re":
        assert list(data) == ["entities", "relations"]
        entity_object(data["entities"])
        assert list(data["relations"]) == list(dict.fromkeys(schema.relations))
        for items in data["relations"].values():
            for item in items:
                assert list(item) == ["head", "tail"]
                spans([item["head"], item["tail"]])
    else:
        assert list(data) == list(dict.fromkeys(schema.events))
        for label, items in data.items():
            for item in items:
                assert list(item) == ["trigger", "arguments"]
                spans([item["trigger"]])
                roles = list(dict.fromkeys(schema.events[label]))
                assert list(item["arguments"]) == [r for r in roles if r in item["arguments"]]  # in order
                for values in item["arguments"].values():
                    spans(values)
    assert ground(task, answer, text, schema)["dropped"] == 0


@given(
    text=st.text(alphabet=st.sampled_from(CHARS), max_size=40),
    schema_triple=schemas(),
    seed=st.integers(0, 2**31 - 1),
    max_new_tokens=st.integers(8, 48),
    budget_aware=st.booleans(),
    # 0.02: near-uniform sampling among allowed tokens; 1.0: a peaked, opinionated random model.
    init_scale=st.sampled_from([0.02, 1.0]),
    boundaries=st.sampled_from(["word", "char"]),
)
@settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_random_model_always_produces_valid_grounded_answers(
    tokenizer_and_model,
    text: str,
    schema_triple,
    seed: int,
    max_new_tokens: int,
    budget_aware: bool,
    init_scale: float,
    boundaries: str,
) -> None:
    tokenizer, _ = tokenizer_and_model
    model = _tiny_llama(tokenizer, seed=seed % 1000, init_scale=init_scale)
    requests = [
        IERequest(task, text, s, span_boundaries=boundaries)
        for task, s in zip(("ner", "re", "ee"), schema_triple, strict=True)
    ]
    prompts = [f"{r.task} | {text} | {json.dumps(r.schema.to_dict(), ensure_ascii=False)}" for r in requests]
    torch.manual_seed(seed)
    answers = constrained_generate(
        model,
        tokenizer,
        prompts,
        requests,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        budget_aware=budget_aware,
    )
    for request, answer in zip(requests, answers, strict=True):
        _check_answer(request.task, answer, text, request.schema, boundaries)


def test_greedy_generation_in_batches(tokenizer_and_model) -> None:
    tokenizer, model = tokenizer_and_model
    texts = ["John works for IBM.", '北京是"中国"的首都', "a\\b", ""]
    requests = [
        IERequest(task, t, {"ner": NER, "re": RE, "ee": EE}[task])
        for t in texts
        for task in ("ner", "re", "ee")
    ]
    prompts = [f"{r.task}: {r.text}" for r in requests]
    answers = constrained_generate(model, tokenizer, prompts, requests, max_new_tokens=24, batch_size=5)
    again = constrained_generate(model, tokenizer, prompts, requests, max_new_tokens=24, batch_size=12)
    assert answers == again  # greedy: batching and padding do not change the answers
    for request, answer in zip(requests, answers, strict=True):
        _check_answer(request.task, answer, request.text, request.schema)


def test_grounding_prefers_occurrences_that_cut_no_word() -> None:
    grounded = ground("ner", '{"LOC":["on","on"]}', "Mon. on", NER)
    assert [(e.start, e.end) for e in grounded["entities"]] == [(5, 7), (5, 7)]
    grounded = ground("ner", '{"LOC":["on"]}', "Mon.", NER)  # no whole-word occurrence: any one
    assert [(e.start, e.end) for e in grounded["entities"]] == [(1, 3)]


def test_answer_repetition_penalty_spares_the_prompt_and_json_punctuation() -> None:
    # Token ids: 0 "John", 1 "]", 2 '","', 3 " ", 4 "IBM", 5 "Mary", 6 special (no bytes).
    table = TokenTable([b"John", b"]", b'","', b" ", b"IBM", b"Mary", None], eos_ids=[6])
    penalty = AnswerRepetitionPenalty(2.0, table, prompt_length=2)
    prompt = [5, 5]  # "Mary" twice in the prompt only: not penalised
    scores = torch.tensor([[4.0, 4.0, 4.0, 4.0, -4.0, 4.0, 4.0, 4.0]])  # a model vocabulary of 8 > 7
    out = penalty(torch.tensor([prompt + [0, 1, 2, 3, 4, 6]]), scores.clone())
    # Written text tokens cost more ("John" halved, "IBM" doubled below zero); "]", '","', " ",
    # the special token, the prompt's "Mary" and ids beyond the tokenizer keep their scores.
    assert out.tolist() == [[2.0, 4.0, 4.0, 4.0, -8.0, 4.0, 4.0, 4.0]]
    assert penalty(torch.tensor([prompt]), scores.clone()).tolist() == scores.tolist()  # nothing written
    none = AnswerRepetitionPenalty(1.0, table, 2)
    assert none(torch.tensor([prompt + [0]]), scores.clone()).tolist() == scores.tolist()
    with pytest.raises(ValueError, match="> 0"):
        AnswerRepetitionPenalty(0.0, table)


def test_constrained_answers_with_a_repetition_penalty_stay_valid(tokenizer_and_model) -> None:
    tokenizer, model = tokenizer_and_model
    requests = [IERequest("ner", "John works for IBM in New York. John Smith too.", NER)] * 2
    prompts = ["ner: John works for IBM in New York.", "ner: John Smith"]
    for answer in constrained_generate(
        model, tokenizer, prompts, requests, max_new_tokens=40, batch_size=2, repetition_penalty=1.5
    ):
        _check_answer("ner", answer, requests[0].text, NER)
