"""A tiny saved chat model for the extract / server tests: built locally (no hub), once per process.

Byte-level BPE trained on the prompts and texts the tests use (so prompts are short in tokens),
a 1-layer random Llama, saved with ``save_model``: loadable by ``load_saved`` like models/sft.
Its answers are noise, but with the constraint always valid JSON of grounded spans.
"""

from __future__ import annotations

import copy
import os
import threading
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub

from chatuie.data.prompts import SYSTEM_PROMPT, ie_user_prompt
from chatuie.data.records import Schema
from chatuie.decoding import IERequest
from chatuie.models.modeling import TinyModelConfig, build_tiny_model, save_model, train_tokenizer

EN_TEXT = "John Smith works for IBM in New York. Mary Jones lives in Boston, near the Charles River."
ZH_TEXT = "东方金钰于2019年3月5日将其持有的1000万股股份质押给中信证券。张三在北京工作。"
SCHEMA_DICT = {
    "entities": ["Peop", "Org", "Loc"],
    "relations": [{"type": "Work_For", "head": "Peop", "tail": "Org"}, "Live_In"],
    "events": {"质押": ["质押方", "质押物", "质权方"]},
}
TINY = TinyModelConfig(
    vocab_size=700,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    max_position_embeddings=512,
    seed=5,
)

_lock = threading.Lock()
_built: dict[str, Path] = {}


def corpus() -> list[str]:
    texts = [SYSTEM_PROMPT, "system\nuser\nassistant\n", EN_TEXT, ZH_TEXT]
    for task, schema in (
        ("ner", Schema(entities=["Peop", "Org", "Loc"])),
        ("re", Schema(entities=["Peop", "Org", "Loc"], relations=["Work_For", "Live_In"])),
        ("ee", Schema(events={"质押": ["质押方", "质押物", "质权方"]})),
    ):
        texts.append(ie_user_prompt(task, EN_TEXT, schema))
        texts.append(ie_user_prompt(task, ZH_TEXT, schema))
    texts += ['{"Peop":["John Smith"],"Org":["IBM"]}', '{"质押":[{"trigger":"质押","arguments":{}}]}']
    return texts * 3


def tiny_model_dir(root: Path) -> Path:
    """The saved tiny model under ``root`` (built on the first call of the process)."""
    with _lock:
        if "dir" not in _built:
            tokenizer = train_tokenizer(corpus(), TINY.vocab_size, min_frequency=2)
            model = build_tiny_model(TINY, tokenizer)
            model.eval()
            _built["dir"] = save_model(model, tokenizer, root / "tiny-chatuie")
        return _built["dir"]


def with_random_head(model: Any, seed: int = 0, scale: float = 0.5) -> Any:
    """A copy of ``model`` with an untied random output head. The saved tiny model ties its head
    to the embedding and so repeats the prompt's last token whatever it is asked; this one
    continues each prompt with its own tokens, so a test can tell answers apart."""
    model = copy.deepcopy(model)
    head = model.get_output_embeddings()
    generator = torch.Generator().manual_seed(seed)
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=generator) * scale)
    model.config.tie_word_embeddings = False
    return model


IE_SCHEMAS = {
    "ner": Schema(entities=["Peop", "Org", "Loc"]),
    "re": Schema(entities=["Peop", "Org", "Loc"], relations=["Work_For", "Live_In"]),
    "ee": Schema(events={"质押": ["质押方", "质押物", "质权方"]}),
}


def ie_jobs(tokenizer) -> tuple[list[str], list[IERequest]]:
    """Chat prompts and their requests: each task on English, Chinese, short and mixed texts."""
    prompts, requests = [], []
    for text in (EN_TEXT, ZH_TEXT, EN_TEXT[:40], ZH_TEXT[:21], f"{EN_TEXT} {ZH_TEXT}"):
        for task, schema in IE_SCHEMAS.items():
            messages = [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": ie_user_prompt(task, text, schema)},
            ]
            prompts.append(
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
            requests.append(IERequest(task, text, schema))
    return prompts, requests
