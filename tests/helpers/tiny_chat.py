"""A tiny chat model's config, a few QA samples and quick training settings (modeling and loss tests)."""

from __future__ import annotations

from chatuie.models.modeling import TinyModelConfig
from chatuie.train.trainer import TeachSettings

SYSTEM = "You are ChatUIE, an assistant that answers questions and extracts information."
QA = [
    ("中国的首都是哪里？", "北京"),
    ("What is the capital of France?", "Paris"),
    ('Text: 高勇：男，中国国籍，无境外居留权。 Entity types: ["CONT"]', '{"CONT":["中国国籍"]}'),
    ("Who wrote Hamlet?", "Shakespeare"),
]
TINY = TinyModelConfig(
    vocab_size=600,
    hidden_size=48,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=256,
    seed=7,
)


def chat(question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


SAMPLES = [{"id": f"s{i}", "task": "qa", "messages": chat(q, a)} for i, (q, a) in enumerate(QA)]
CORPUS_EXTRA = [
    "北京是中国的首都，上海是中国最大的城市。高勇担任公司董事长。",
    "Paris is the capital of France. Shakespeare wrote Hamlet and Macbeth.",
    '{"LOC":[],"ORG":["中国银行"],"PER":["高勇"]} {"entities": {"Peop": ["Wright"]}}',
]


def settings(**overrides) -> TeachSettings:
    base = dict(
        max_steps=30,
        learning_rate=3e-3,
        per_device_batch_size=4,
        gradient_accumulation=1,
        max_length=128,
        warmup_ratio=0.0,
        weight_decay=0.0,
        lr_scheduler="constant",
        save_steps=0,
        logging_steps=5,
        seed=3,
    )
    base.update(overrides)
    return TeachSettings(**base)
