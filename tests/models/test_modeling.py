"""Tokenizer, tiny model, chat training (+resume after a kill), LoRA save/load/merge. CPU, tiny sizes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub

import pytest
import torch

from chatuie.config import build
from chatuie.models.modeling import (
    IM_END,
    LoraSettings,
    ModelConfig,
    TinyModelConfig,
    build_tiny_model,
    chat_texts,
    generate,
    is_peft,
    load_model,
    load_saved,
    merge_lora,
    save_model,
    train_tokenizer,
)
from chatuie.train.trainer import TeachSettings, last_checkpoint, teach_to_answer, train_sft
from tests.helpers.tiny_chat import CORPUS_EXTRA, QA, SAMPLES, SYSTEM, TINY, chat, settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and spin-waiting OpenMP threads crawl on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(list(chat_texts(SAMPLES)) + CORPUS_EXTRA * 3, vocab_size=TINY.vocab_size, seed=1)


@pytest.fixture(scope="module")
def saved_tiny(tokenizer, tmp_path_factory) -> Path:
    """A tiny model + tokenizer written with save_pretrained, as a 'local directory' base."""
    out = tmp_path_factory.mktemp("tiny_base")
    model = build_tiny_model(TINY, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "高勇：男，中国国籍，无境外居留权，",
        'Answer in JSON: {"LOC":[],"CONT":["中国国籍"]}',
        "  two leading spaces,\ttab,\r\nCRLF and trailing  ",
        "emoji 😀, accents é ß, fullwidth ＡＢＣ１２３ and 「引号」",
        "",
    ],
)
def test_tokenizer_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_tokenizer_merges_chinese_and_is_deterministic(tokenizer):
    text = "北京是中国的首都"
    assert len(tokenizer.encode(text, add_special_tokens=False)) < len(text.encode("utf-8")) / 2
    again = train_tokenizer(list(chat_texts(SAMPLES)) + CORPUS_EXTRA * 3, vocab_size=TINY.vocab_size, seed=1)
    assert again.get_vocab() == tokenizer.get_vocab()


def test_special_tokens_and_eos_scheme(tokenizer):
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1


def test_chat_template_generation_prompt(tokenizer):
    text = tokenizer.apply_chat_template(chat("你好？"), tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n你好？<|im_end|>\n<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(chat("你好？"), tokenize=False)
    assert not without.endswith("<|im_start|>assistant\n")


def test_assistant_mask_covers_answer_and_end_marker(tokenizer):
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    for question, answer in QA:
        messages = chat(question, answer) + [
            {"role": "user", "content": "再说一遍"},
            {"role": "assistant", "content": "ok"},
        ]
        out = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
        ids, mask = out["input_ids"], out["assistant_masks"]
        assert len(ids) == len(mask)
        masked = [tok for tok, bit in zip(ids, mask, strict=True) if bit]
        assert tokenizer.decode(masked) == f"{answer}{IM_END}ok{IM_END}"
        # The full conversation is the prompt with the generation prompt, then answer tokens.
        prompt = tokenizer.apply_chat_template(chat(question), add_generation_prompt=True)
        first = mask.index(1)
        assert ids[:first] == list(prompt if isinstance(prompt, list) else prompt["input_ids"])
    assert is_chat_template_stop_token_trained(tokenizer)


# ---------------------------------------------------------------------------------------------- model


def test_tiny_model_is_deterministic_and_generates(tokenizer):
    a = build_tiny_model(TINY, tokenizer)
    b = build_tiny_model(TINY, tokenizer)
    c = build_tiny_model(TinyModelConfig(**{**TINY.__dict__, "seed": TINY.seed + 1}), tokenizer)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.config.vocab_size == len(tokenizer)
    assert tokenizer.convert_tokens_to_ids(IM_END) in a.generation_config.eos_token_id
    answers = generate(a, tokenizer, [chat("你好"), chat("A longer question here?")], max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(x, str) for x in answers)


def test_model_config_builds_from_params():
    config = build(
        ModelConfig,
        {
            "base": "tiny",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "tiny": {"hidden_size": 64, "seed": 1},
        },
        "params.yaml: model",
    )
    assert config.lora == LoraSettings(r=4, alpha=8, dropout=0.0)
    assert config.tiny.hidden_size == 64 and config.tiny.num_layers == TinyModelConfig().num_layers
    with pytest.raises(ValueError, match="texts"):
        load_model(ModelConfig())


def test_packed_rows_do_not_attend_across_samples(tokenizer):
    """What TRL's padding-free BFD packing relies on: restarting position ids split attention (sdpa).

    Only without a KV cache (transformers skips the detection when past_key_values is set; TRL trains with
    use_cache=False).
    """
    model = build_tiny_model(TINY, tokenizer).eval()
    x = tokenizer.encode("北京是中国的首都", add_special_tokens=False)
    y = tokenizer.encode("Paris is the capital", add_special_tokens=False)
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([x + y]),
            position_ids=torch.tensor([list(range(len(x))) + list(range(len(y)))]),
            use_cache=False,
        ).logits[0]
        alone = model(input_ids=torch.tensor([y])).logits[0]
    torch.testing.assert_close(packed[len(x) :], alone, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- training


def test_teach_to_answer_overfits_a_tiny_set(tokenizer, tmp_path):
    model = build_tiny_model(TINY, tokenizer)
    result = teach_to_answer(model, tokenizer, SAMPLES * 4, settings(max_steps=80), tmp_path / "run")
    losses = [entry["loss"] for entry in result.loss_log]
    assert result.global_step == 80 and result.resumed_from is None
    assert [e["step"] for e in result.loss_log][:2] == [1, 5]
    assert losses[-1] < 0.5 * losses[0], losses
    questions = [chat(q) for q, _ in QA]
    answers = generate(result.model, tokenizer, questions, max_new_tokens=24)
    assert answers == [a for _, a in QA]
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # save_steps=0: no checkpoints
    # TRL's chunked-loss forward patch is undone: a labelled forward still returns logits.
    probe = tokenizer.apply_chat_template(chat(QA[1][0], QA[1][1]), return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = result.model(**probe, labels=probe["input_ids"])
    assert out.logits is not None and out.loss is not None


def test_samples_longer_than_max_length_are_left_out(tokenizer, tmp_path):
    long = {"id": "long", "messages": chat("很长的问题" * 60, "答案")}
    model = build_tiny_model(TINY, tokenizer)
    result = teach_to_answer(model, tokenizer, SAMPLES + [long], settings(max_steps=1), tmp_path / "run")
    assert result.too_long == 1 and result.global_step == 1
    with pytest.raises(ValueError, match="fits max_length"):
        teach_to_answer(model, tokenizer, [long], settings(max_steps=1), tmp_path / "run2")


def test_packing_mode_trains(tokenizer, tmp_path):
    model = build_tiny_model(TINY, tokenizer)
    result = teach_to_answer(
        model, tokenizer, SAMPLES * 2, settings(max_steps=3, packing=True, logging_steps=1), tmp_path / "run"
    )
    assert result.global_step == 3 and all(e["loss"] > 0 for e in result.loss_log)


KILL_SCRIPT = """
import sys, time
from transformers import TrainerCallback
from chatuie.models.modeling import ModelConfig, load_model
from chatuie.train.trainer import TeachSettings, teach_to_answer

class HangAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        print("saved", state.global_step, flush=True)
        time.sleep(600)  # the test kills the process here, mid-run, after a complete checkpoint

base, out, settings, samples = sys.argv[1], sys.argv[2], eval(sys.argv[3]), eval(sys.argv[4])
model, tokenizer = load_model(ModelConfig(base=base))
teach_to_answer(model, tokenizer, samples, TeachSettings(**settings), out, callbacks=[HangAfterFirstSave()])
"""


def test_resume_after_kill(saved_tiny, tmp_path):
    run_dir = tmp_path / "run"
    plan = settings(max_steps=100, save_steps=2, logging_steps=1, per_device_batch_size=2)
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT), encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(saved_tiny), str(run_dir), repr(plan.__dict__), repr(SAMPLES)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # A half-written later checkpoint (no trainer_state.json) must never be picked.
    (run_dir / "checkpoint-4").mkdir()
    assert last_checkpoint(run_dir) == run_dir / "checkpoint-2"

    model, tokenizer = load_model(ModelConfig(base=str(saved_tiny)))
    resumed = teach_to_answer(
        model, tokenizer, SAMPLES, settings(**{**plan.__dict__, "max_steps": 6}), run_dir
    )
    assert resumed.resumed_from == str(run_dir / "checkpoint-2")
    assert resumed.global_step == 6
    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [e["step"] for e in resumed.loss_log] == [1, 2, 3, 4, 5, 6]  # steps 1-2 come from the checkpoint

    # Rerunning a finished run trains nothing and hands back the checkpointed weights.
    model, tokenizer = load_model(ModelConfig(base=str(saved_tiny)))
    rerun = teach_to_answer(model, tokenizer, SAMPLES, settings(**{**plan.__dict__, "max_steps": 6}), run_dir)
    assert rerun.global_step == 6 and rerun.resumed_from == str(run_dir / "checkpoint-6")
    for (name, pa), (_, pb) in zip(
        rerun.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(pa, pb), name

    # Same result as an uninterrupted run: resume restored weights, optimizer, scheduler and data order.
    model, tokenizer = load_model(ModelConfig(base=str(saved_tiny)))
    straight = teach_to_answer(
        model,
        tokenizer,
        SAMPLES,
        settings(**{**plan.__dict__, "max_steps": 6, "save_steps": 0}),
        tmp_path / "ref",
    )
    for a, b in zip(resumed.loss_log, straight.loss_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for (name, pa), (_, pb) in zip(
        resumed.model.state_dict().items(), straight.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=name)


def test_rerun_of_a_run_finished_mid_epoch_trains_nothing(saved_tiny, tmp_path):
    """transformers resumes a run that stopped mid-epoch at max_steps with one more step; we do not."""
    per_epoch = -(-len(SAMPLES) // 2)
    plan = settings(
        max_steps=per_epoch + 1, save_steps=per_epoch + 1, logging_steps=1, per_device_batch_size=2
    )
    model, tokenizer = load_model(ModelConfig(base=str(saved_tiny)))
    first = teach_to_answer(model, tokenizer, SAMPLES, plan, tmp_path / "run")
    model, tokenizer = load_model(ModelConfig(base=str(saved_tiny)))
    again = teach_to_answer(model, tokenizer, SAMPLES, plan, tmp_path / "run")
    assert again.global_step == first.global_step == plan.max_steps
    assert again.loss_log == first.loss_log
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == [f"checkpoint-{plan.max_steps}"]
    for (name, pa), (_, pb) in zip(
        again.model.state_dict().items(), first.model.state_dict().items(), strict=True
    ):
        assert torch.equal(pa, pb), name


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_adapters_start_the_same_whatever_the_random_state_and_leave_it_alone(saved_tiny):
    """The adapter is drawn from model.lora.seed: an unseeded draw made every SFT run another model."""
    config = ModelConfig(base=str(saved_tiny), lora=LoraSettings(r=4, alpha=8, dropout=0.0))

    def adapter(global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        model, _ = load_model(config)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, second = adapter(0), adapter(1)
    assert first and all(torch.equal(first[n], second[n]) for n in first)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_model(config)
    assert torch.equal(torch.rand(3), expected)  # the caller's random state is untouched
    other = ModelConfig(base=str(saved_tiny), lora=LoraSettings(r=4, alpha=8, dropout=0.0, seed=14))
    changed = {n: p for n, p in load_model(other)[0].named_parameters() if "lora_A" in n}
    assert any(not torch.equal(first[n], changed[n]) for n in first)


def test_lora_from_local_dir_train_save_reload_merge(saved_tiny, tmp_path):
    config = ModelConfig(base=str(saved_tiny), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    model, tokenizer = load_model(config)
    assert is_peft(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = teach_to_answer(
        model, tokenizer, SAMPLES, settings(max_steps=4, logging_steps=1), tmp_path / "run"
    )
    model = result.model
    after = dict(model.named_parameters())
    lora = [name for name in before if "lora_" in name]
    assert lora
    assert any(not torch.equal(before[name], after[name]) for name in lora if "lora_B" in name)
    for name in before:
        if "lora_" not in name:
            assert torch.equal(before[name], after[name]), f"base weight changed: {name}"

    probe = tokenizer.apply_chat_template(chat(QA[0][0], QA[0][1]), return_tensors="pt", return_dict=True)
    model.eval()
    with torch.no_grad():
        logits = model(**probe).logits

    out = save_model(model, tokenizer, tmp_path / "adapter")
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    note = json.loads((out / "chatuie_model.json").read_text())
    assert note["kind"] == "lora" and Path(note["base"]) == saved_tiny.resolve()

    reloaded, tok2 = load_saved(out)
    assert is_peft(reloaded) and tok2.chat_template == tokenizer.chat_template
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).logits, logits)

    merged = merge_lora(reloaded)
    assert not is_peft(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(**probe).logits, logits, atol=1e-5, rtol=1e-4)

    full = save_model(merged, tok2, tmp_path / "merged")
    again, _ = load_saved(full)
    with torch.no_grad():
        torch.testing.assert_close(again(**probe).logits, logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss_type", ["chunked_nll", "answer_nll"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_foreign_tokenizer_without_template_gets_chatml(tmp_path, tied, loss_type):
    """A local base whose tokenizer has no chat template and no ChatML tokens (a plain LM): the two
    added tokens train with LoRA under TRL's default (chunked) loss and under chatuie's answer loss,
    tied embeddings or not (peft's TrainableTokensWrapper on a tied head had no ``bias``, which the
    chunked loss reads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(list(chat_texts(SAMPLES)), trainer=trainer)
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(plain),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            eos_token_id=0,
            tie_word_embeddings=tied,
        )
    )
    base = tmp_path / "plain"
    lm.save_pretrained(base)
    plain.save_pretrained(base)

    model, tokenizer = load_model(ModelConfig(base=str(base), lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    assert (
        len(tokenizer) == len(plain) + 2 and tokenizer.eos_token == IM_END and tokenizer.pad_token == "</s>"
    )
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert model.generation_config.eos_token_id[0] == im_end and 0 in model.generation_config.eos_token_id
    deltas = {n: p.detach().clone() for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    assert len(deltas) == (1 if tied else 2)  # the input rows, and the head's own when untied
    assert TeachSettings().loss_type == "chunked_nll"  # TRL's default unless params say otherwise
    two_steps = settings(max_steps=2, logging_steps=1, loss_type=loss_type)
    result = teach_to_answer(model, tokenizer, SAMPLES, two_steps, tmp_path / "run")
    trained = dict(result.model.named_parameters())
    for name, before in deltas.items():
        assert not torch.equal(trained[name], before), f"new token rows not trained: {name}"
    probe = tokenizer.apply_chat_template(chat("hi", "there"), return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = result.model.eval()(**probe).logits
    reloaded, tok2 = load_saved(save_model(result.model, tokenizer, tmp_path / "adapter"))
    assert tok2.eos_token == IM_END and len(tok2) == len(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).logits, logits)


def test_a_model_saved_in_one_dtype_loads_and_decodes_in_the_other(saved_tiny, tmp_path):
    """dtype auto can differ between the machine that trained and the one that evaluates."""
    config = ModelConfig(base=str(saved_tiny), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    model, tokenizer = load_model(config)
    adapter = save_model(model, tokenizer, tmp_path / "adapter")  # float32 base + adapter
    full = save_model(merge_lora(load_saved(adapter, dtype="bfloat16")[0]), tokenizer, tmp_path / "bf16")
    assert json.loads((full / "chatuie_model.json").read_text())["dtype"] == "bfloat16"
    probe = tokenizer.apply_chat_template(
        chat(QA[0][0]), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    outputs = {}
    for source, dtype in ((adapter, "bfloat16"), (full, "float32"), (full, None)):
        loaded, tok = load_saved(source, dtype=dtype)
        expected = {"bfloat16": torch.bfloat16, "float32": torch.float32, None: torch.bfloat16}[dtype]
        base = {p.dtype for name, p in loaded.named_parameters() if "lora_" not in name}
        assert base == {expected}, (source, dtype)  # (peft keeps adapters in float32)
        with torch.no_grad():
            out = loaded.generate(**probe, max_new_tokens=4, do_sample=False)
        outputs[(source.name, dtype)] = out.shape[1] > probe["input_ids"].shape[1]
    assert all(outputs.values()), outputs


def test_training_logs_progress_with_eta_and_its_time_per_step(saved_tiny, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("CHATUIE_PROGRESS", "plain")
    caplog.set_level(logging.INFO, logger="chatuie.progress")
    model, tokenizer = load_model(ModelConfig(base=str(saved_tiny)))
    result = train_sft(model, tokenizer, SAMPLES, settings(max_steps=3, logging_steps=1), tmp_path / "run")
    got = [r.getMessage() for r in caplog.records if r.name == "chatuie.progress"]
    assert got and got[0].startswith("sft: step 1/3 (33 %), ") and "ETA" in got[0], got
    assert result.seconds_per_step is not None and result.seconds_per_step > 0
