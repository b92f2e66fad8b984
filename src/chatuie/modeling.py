"""Models and tokenizers: the embedded tiny chat model, loading hub/local models (+LoRA), chat training.

Token scheme (ChatML, as Qwen2.5-Instruct):

* ``<|im_start|>`` / ``<|im_end|>`` open and close every turn; ``<|endoftext|>`` pads.
* ``tokenizer.eos_token`` is ``<|im_end|>`` (the token a generated answer stops on);
  ``tokenizer.pad_token`` is ``<|endoftext|>``; ``model.generation_config.eos_token_id`` lists both.
* The chat template wraps each assistant answer *and its* ``<|im_end|>`` in
  ``{% generation %}...{% endgeneration %}``, so ``return_assistant_tokens_mask=True`` (TRL's
  ``assistant_only_loss``) trains the answer and the stop token, nothing of the prompt.

Training goes through TRL's ``SFTTrainer`` with CPU-safe arguments; see :func:`train_chat`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from chatuie.answer_loss import patch_answer_loss
from chatuie.config import ConfigError
from chatuie.launch import is_main_process, per_process_batch
from chatuie.packaged import (
    GEMMA_CHAT_TEMPLATE,
    GEMMA_TURN_TOKENS,
    PACKAGED_PREFIX,
    installed_pin,
    materialize,
    packaged_name,
    read_pin,
)

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# ChatML; the assistant's content and its <|im_end|> are the generation (= trained) span. The newline that
# separates turns stays outside: the model stops at <|im_end|> and never has to produce it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Turn formats a tokenizer without a chat template gets, first whose tokens its vocabulary already has
# (no embedding to resize); none: ChatML's tokens are added.
TURN_FORMATS = ((IM_START, IM_END), GEMMA_TURN_TOKENS)

ANSWER_NLL = "answer_nll"  # TeachSettings.loss_type of chatuie.answer_loss
LOSS_TYPES = (ANSWER_NLL, "chunked_nll", "nll", "dft")  # the last three: TRL's own
NOTE_FILE = "chatuie_model.json"  # what save_model wrote: full model or adapter (+ its base)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------- configs


@dataclass
class TinyModelConfig:
    """The embedded default model: a small Llama trained from scratch on the prepared data."""

    vocab_size: int = 6000  # BPE target size (the real size may be smaller on a small corpus)
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    seed: int = 13


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # None = peft's default for the architecture (q_proj, v_proj for Llama/Qwen2); ["all-linear"] = every
    # linear layer but the output head.
    target_modules: list[str] | None = None
    # Decoder layers that get adapters (None = all). The upper layers only: the backward pass stops
    # at the lowest adapted layer, a cheaper step on CPU.
    layers: list[int] | None = None
    # float32: adapters in float32 over any base (peft's default: every adapted layer casts its input
    # to float32 and back) | base: the base weights' dtype (bfloat16 over a bfloat16 base: no casts;
    # bench/train.py measures both).
    dtype: str = "float32"


@dataclass
class ModelConfig:
    """The ``model`` section of params.yaml."""

    # "tiny" (embedded, built locally), a packaged model ("gemma3-270m", chatuie.packaged), a hub id,
    # or a local directory
    base: str = "tiny"
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # hub/local models; None = transformers' default (sdpa)
    lora: LoraSettings | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class TeachSettings:
    """One causal-LM training run on chat samples (loss on the assistant turns only)."""

    max_steps: int = 200
    learning_rate: float = 5e-4
    per_device_batch_size: int = 8
    gradient_accumulation: int = 1
    max_length: int = 512  # tokens per sample (longer ones are left out); packed rows have this length
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    save_steps: int = 50  # checkpoint every N optimizer steps (0 = no checkpoints)
    save_total_limit: int | None = 2
    logging_steps: int = 10
    seed: int = 13
    # False: length-grouped batches (little padding, no cross-sample attention question at all).
    # True: TRL's BFD packing (padding-free rows; transformers 5 derives a block-diagonal mask
    # from the position ids on sdpa/eager, so packed samples do not attend to each other).
    packing: bool = False
    # "answer_nll": answer tokens only, the output head in the weights' dtype (chatuie.answer_loss; ~2.5x
    # faster steps on Gemma here, bench/train.py) | "chunked_nll": TRL 1.12's default (the head in
    # float32, in checkpointed chunks) | "nll": the plain cross-entropy over every position
    loss_type: str = "chunked_nll"
    device: str = "cpu"  # "cpu" (use_cpu=True, reproducible on the reference machine) | "auto" (GPU if any)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"train.loss_type: expected one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}"
            )


# ------------------------------------------------------------------------------------------- tokenizer


def chat_texts(samples: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Tokenizer training texts from chat samples: every message content, and the role names."""
    yield "system\nuser\nassistant\n"
    for sample in samples:
        for message in sample["messages"]:
            yield message["content"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, seed: int = 13, *, min_frequency: int = 2):
    """A byte-level BPE tokenizer (exact round trip for any text) with the ChatML chat template.

    Training is deterministic for the same texts (BPE counts pairs and breaks ties by id; it draws no
    random numbers), so ``seed`` changes nothing today; it is taken for symmetry with the model builders.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        extra_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids generation stops on: the end of turn (ChatML's or Gemma's), then eos and
    <|endoftext|>, where the vocabulary has them."""
    ids: list[int] = []
    for token in (IM_END, GEMMA_TURN_TOKENS[1], tokenizer.eos_token, ENDOFTEXT):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def _configure_generation(model, tokenizer) -> None:
    """Stop generation on the end of turn (and the model's own eos ids); pad with the tokenizer's pad."""
    stops = stop_token_ids(tokenizer)
    for owner in (model.generation_config, model.config):
        current = owner.eos_token_id
        current = [] if current is None else [current] if isinstance(current, int) else list(current)
        owner.eos_token_id = stops + [i for i in current if i not in stops]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


# -------------------------------------------------------------------------------------------- models


def build_tiny_model(config: TinyModelConfig, tokenizer):
    """A Llama from scratch sized by ``config``; same seed -> identical weights (global RNG untouched)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if config.hidden_size % config.num_heads or config.num_heads % config.num_kv_heads:
        raise ValueError("tiny model: hidden_size must divide by num_heads, num_heads by num_kv_heads")
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        bos_token_id=None,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(llama)
    model.generation_config = GenerationConfig(
        eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    _configure_generation(model, tokenizer)
    return model


def _dtype(name: str):
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"model.dtype: unknown {name!r} (known: auto, {', '.join(_DTYPES)})")
    return _DTYPES[name]


def _ensure_chat_ready(model, tokenizer) -> list[int]:
    """Make a loaded model/tokenizer pair trainable with assistant-only loss and ready to generate.

    A tokenizer without a chat template, or with one that has no ``{% generation %}`` markers and that
    TRL cannot patch (TRL knows Qwen2.5/3, Llama 3, Gemma, Phi-3, ...), gets a marked template of ours:
    the first of :data:`TURN_FORMATS` whose turn tokens its vocabulary has (Gemma's own
    ``<start_of_turn>``/``<end_of_turn>``: nothing added), else ChatML with ``<|im_start|>``/``<|im_end|>``
    added (embeddings resized). The end-of-turn token becomes eos. No pad token -> pad = the old eos.
    Left padding. Returns the ids of the tokens that had to be added.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if template and not has_generation_markers(template):
        try:
            get_training_chat_template(tokenizer)  # TRL swaps in its marked version at training time
        except ValueError:
            logger.warning("chat template has no generation markers TRL can add: using a marked one")
            template = None
    added: list[int] = []
    if not template:
        vocab = tokenizer.get_vocab()
        turn = next((pair for pair in TURN_FORMATS if all(t in vocab for t in pair)), (IM_START, IM_END))
        missing = [tok for tok in turn if tok not in vocab]
        if missing:
            tokenizer.add_special_tokens(
                {"extra_special_tokens": missing}, replace_extra_special_tokens=False
            )
            added = [tokenizer.convert_tokens_to_ids(tok) for tok in missing]
        old_eos = tokenizer.eos_token
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE if turn == GEMMA_TURN_TOKENS else CHAT_TEMPLATE
        tokenizer.eos_token = turn[1]
        if tokenizer.pad_token is None:
            tokenizer.pad_token = old_eos or turn[1]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    _configure_generation(model, tokenizer)
    return added


def _embedding_names(model) -> tuple[str, str | None]:
    """Module names of the input embedding and, when not tied to it, the output head."""
    names = {id(module): name for name, module in model.named_modules()}
    head = model.get_output_embeddings()
    tied = head is None or head.weight is model.get_input_embeddings().weight
    return names[id(model.get_input_embeddings())].rsplit(".", 1)[-1], (
        None if tied else names[id(head)].rsplit(".", 1)[-1]
    )


def _expose_head_bias(model) -> None:
    """peft's ``TrainableTokensWrapper`` around an LM head forwards ``weight`` (the merged rows) but
    not ``bias``, which TRL's chunked loss reads (``AttributeError: ... no attribute 'bias'``). Its
    own forward is ``F.linear(x, merged_weight)``, no bias: give the wrapper that (None)."""
    from peft.utils.other import TrainableTokensWrapper

    head = model.get_output_embeddings()
    if isinstance(head, TrainableTokensWrapper) and "bias" not in head.__dict__:
        if getattr(head.token_adapter.base_layer, "bias", None) is not None:
            raise ValueError("trainable new tokens on an LM head with a bias: peft would drop the bias")
        head.__dict__["bias"] = None


def _linear_names(model) -> list[str]:
    """Names (last component) of every linear layer but the output head: peft's "all-linear"."""
    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )


def _wrap_lora(model, lora: LoraSettings, added_token_ids: Sequence[int] = ()):
    from peft import LoraConfig, get_peft_model

    trainable_tokens = None
    if added_token_ids:
        # New chat tokens have untrained embeddings: the adapter trains those rows (of the output head
        # too when it is not tied to the input embedding), nothing else of the 2 matrices.
        embed, head = _embedding_names(model)
        trainable_tokens = {embed: list(added_token_ids)}
        if head is not None:
            trainable_tokens[head] = list(added_token_ids)
    targets: str | list[str] | None = lora.target_modules
    if targets == ["all-linear"]:
        # peft's "all-linear" takes no layer selection: the same modules, named.
        targets = _linear_names(model) if lora.layers is not None else "all-linear"
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=lora.layers,
        trainable_token_indices=trainable_tokens,
    )
    if lora.dtype not in ("float32", "base"):
        raise ValueError(f"model.lora.dtype: expected 'float32' or 'base', got {lora.dtype!r}")
    model = get_peft_model(model, peft_config, autocast_adapter_dtype=lora.dtype == "float32")
    _expose_head_bias(model)
    return model


def build_tiny(config: ModelConfig, texts: Iterable[str]):
    """The embedded default: tokenizer trained on ``texts``, Llama built from ``config.tiny``."""
    tokenizer = train_tokenizer(texts, config.tiny.vocab_size, config.tiny.seed)
    model = build_tiny_model(config.tiny, tokenizer)
    return model, tokenizer


def load_model(config: ModelConfig, path_or_id: str | None = None, *, texts: Iterable[str] | None = None):
    """(model, tokenizer) for ``path_or_id`` (default ``config.base``), wrapped with LoRA if configured.

    ``"tiny"`` builds the embedded model and needs ``texts`` to train its tokenizer; anything else is a
    hub id or a local directory (a directory written by :func:`save_model` holding a LoRA adapter is
    loaded through :func:`load_saved`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = path_or_id or config.base
    if name := packaged_name(source):
        # A packaged model, converted once into the local cache (the base stage writes models/base).
        source = str(materialize(installed_pin(name), dtype=packaged_dtype(config.dtype)))
    if source == "tiny":
        if texts is None:
            raise ValueError("model.base 'tiny' is built from scratch: pass texts to train its tokenizer")
        model, tokenizer = build_tiny(config, texts)
        added: list[int] = []
    elif (Path(source) / "adapter_config.json").exists():
        model, tokenizer = load_saved(source, trainable=config.lora is not None)
        return model, tokenizer
    else:
        kwargs: dict[str, Any] = {
            "dtype": _dtype(config.dtype),
            "trust_remote_code": config.trust_remote_code,
        }
        if config.attn_implementation:
            kwargs["attn_implementation"] = config.attn_implementation
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        added = _ensure_chat_ready(model, tokenizer)
    if config.lora is not None:
        model = _wrap_lora(model, config.lora, added)
    return model, tokenizer


def packaged_dtype(name: str) -> str:
    """The dtype a packaged model is converted in: what ``model.dtype`` asks, bfloat16 for auto."""
    return "float32" if name == "float32" else "bfloat16"


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge_lora(model):
    """The plain model with the LoRA weights folded in (consumes ``model``); other models pass through."""
    if not is_peft(model):
        return model
    return model.merge_and_unload()


def full_weights(model):
    """``model`` with LoRA merged in and every weight trainable (full fine-tuning from it)."""
    model = merge_lora(model)
    model.requires_grad_(True)
    return model


def _base_of(model) -> str | None:
    config = model.peft_config[model.active_adapter]
    base = config.base_model_name_or_path
    if base and Path(base).is_dir():
        return str(Path(base).resolve())
    return base or None


def save_model(model, tokenizer, out_dir: str | Path, *, base: str | None = None) -> Path:
    """Write a full model, or a LoRA adapter plus a note naming its base, and the tokenizer.

    ``base`` overrides where the adapter's base is reloaded from (default: the path or hub id the
    base was loaded from).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if is_peft(model):
        base = base or _base_of(model)
        if not base:
            raise ValueError(
                "cannot save a LoRA adapter whose base has no path or hub id: "
                "save the base model first and pass base=<its directory>"
            )
        model.save_pretrained(out)
        note = {"kind": "lora", "base": base, "dtype": dtype}
        pin = read_pin(base) if Path(base).is_dir() else None
        if pin is not None:
            # The base is a packaged model: the adapter can be rebuilt on it anywhere the same
            # package is installed (the registry stores the adapter and this pin, not the base).
            note["base_pin"] = dataclasses.asdict(pin)
    else:
        model.save_pretrained(out)
        note = {"kind": "full", "dtype": dtype}
    note["trust_remote_code"] = bool(getattr(model.config, "auto_map", None))
    tokenizer.save_pretrained(out)
    (out / NOTE_FILE).write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    return out


def _adapter_base(out: Path, note: dict[str, Any], dtype: str) -> str:
    """Where an adapter's base loads from: its directory, a hub id, or (a packaged base that is not
    on this machine, e.g. a registry download) the packaged model rebuilt from its pin."""
    base = note.get("base") or json.loads((out / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    pin = note.get("base_pin")
    if pin and (base.startswith(PACKAGED_PREFIX) or not Path(base).is_dir()):
        return str(materialize(pin, dtype=packaged_dtype(dtype), where=str(out)))
    return base


def load_saved(out_dir: str | Path, *, trainable: bool = False, dtype: str | None = None):
    """(model, tokenizer) from a :func:`save_model` directory: a full model or an adapter on its base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    note_path = out / NOTE_FILE
    note = json.loads(note_path.read_text(encoding="utf-8")) if note_path.exists() else {}
    trust = bool(note.get("trust_remote_code", False))
    torch_dtype = _dtype(dtype or note.get("dtype", "float32"))
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=trust)
    if (out / "adapter_config.json").exists():
        from peft import PeftModel

        base = _adapter_base(out, note, dtype or note.get("dtype", "float32"))
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, trust_remote_code=trust)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, out, is_trainable=trainable)
    else:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype, trust_remote_code=trust)
    _ensure_chat_ready(model, tokenizer)
    if not trainable:
        model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict[str, str]]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy answers (text up to the end of turn) for chats ending in a user turn; left padding."""
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    answers: list[str] = []
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_kwargs}
    kwargs.setdefault("eos_token_id", model.generation_config.eos_token_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    for start in range(0, len(conversations), batch_size):
        chunk = [list(c) for c in conversations[start : start + batch_size]]
        batch = tokenizer.apply_chat_template(
            chunk, add_generation_prompt=True, return_dict=True, padding=True, return_tensors="pt"
        )
        batch = {k: v.to(model.device) for k, v in batch.items()}
        output = model.generate(**batch, **kwargs)
        new = output[:, batch["input_ids"].shape[1] :]
        answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    if was_training:
        model.train()
    return answers


# ------------------------------------------------------------------------------------------ training


class TrainResult(NamedTuple):
    model: Any
    loss_log: list[dict[str, float]]  # [{"step": int, "loss": float}, ...] over the whole run
    global_step: int
    resumed_from: str | None  # checkpoint directory the run continued from
    too_long: int  # training samples left out: longer than settings.max_length tokens


def claim_checkpoints(output_dir: str | Path, identity: Any) -> bool:
    """Whether checkpoints in ``output_dir`` belong to the run described by ``identity``.

    Checkpoint folders outlive runs (a DVC ``persist`` out) so that a killed run resumes; a run with
    other params, data or starting weights must not continue from them. The folder is stamped with
    this run's fingerprint; pass the result as ``resume=`` to :func:`train_chat` (False wipes them).
    """
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=repr).encode()).hexdigest()
    out = Path(output_dir)
    marker = out / "run_fingerprint.txt"
    same = marker.is_file() and marker.read_text(encoding="utf-8").strip() == fingerprint
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint + "\n", encoding="utf-8")
    return same


def file_digest(path: str | Path) -> str:
    """sha256 of a file or of every file under a folder (sorted), for run fingerprints."""
    digest = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode() if root.is_dir() else b"")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest *complete* ``checkpoint-N`` (trainer_state.json is written last); None if none."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-") :].isdigit():
            found.append((int(name[len("checkpoint-") :]), path))
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("ignoring incomplete checkpoint %s", path)
            continue
        return path
    return None


def _finished_state(checkpoint: Path | None, max_steps: int) -> dict[str, Any] | None:
    """``checkpoint``'s trainer state if that run already reached ``max_steps``, else None."""
    if checkpoint is None or max_steps <= 0:
        return None
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return state if int(state.get("global_step", 0)) >= max_steps else None


def _drop_incomplete_after(output_dir: Path, keep: Path | None) -> None:
    """Remove checkpoint dirs newer than ``keep`` (interrupted writes) so they cannot shadow it."""
    keep_step = int(keep.name.split("-")[-1]) if keep else -1
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name[len("checkpoint-") :]
        if path.is_dir() and suffix.isdigit() and int(suffix) > keep_step:
            logger.warning("removing interrupted checkpoint %s", path)
            shutil.rmtree(path)


def freeze_input_embeddings(*models) -> None:
    """No gradient for each model's input embedding (nor for an output head tied to it)."""
    for model in models:
        model.get_input_embeddings().weight.requires_grad_(False)


def trainer_safety_args(device: str, seed: int) -> dict[str, Any]:
    """The arguments every TRL config here shares: seeded, CPU-safe, quiet.

    TRL defaults to bf16 and gradient checkpointing; transformers 5.23 renamed gradient_checkpointing
    to activation_checkpointing, and TRL's gradient_checkpointing=True is copied over unless the new
    name is set. No trackers (MLflow is ours), no worker processes, no progress bars.
    """
    return {
        "seed": seed,
        "data_seed": seed,
        "use_cpu": device == "cpu",
        "bf16": False,
        "fp16": False,
        "activation_checkpointing": False,
        "report_to": [],
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        # Data-parallel runs (chatuie.launch): every parameter gets a gradient in these dense models;
        # transformers' default (True without checkpointing) costs an extra autograd traversal.
        "ddp_find_unused_parameters": False,
    }


def sft_config(settings: TeachSettings, output_dir: str | Path, *, has_eval: bool = False, **overrides: Any):
    """TRL ``SFTConfig`` for a CPU-safe, assistant-only, checkpointed run (``overrides`` win)."""
    from trl import SFTConfig

    if settings.device not in ("cpu", "auto"):
        raise ValueError(f"device: expected 'cpu' or 'auto', got {settings.device!r}")
    save = settings.save_steps > 0
    # Data-parallel (chatuie.launch): the params' batch x accumulation is the global batch.
    batch, accumulation = per_process_batch(settings.per_device_batch_size, settings.gradient_accumulation)
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": settings.max_steps,
        "learning_rate": settings.learning_rate,
        "per_device_train_batch_size": batch,
        "per_device_eval_batch_size": batch,
        "gradient_accumulation_steps": accumulation,
        # transformers 5 dropped warmup_ratio: a float < 1 in warmup_steps is the ratio.
        "warmup_steps": settings.warmup_ratio,
        "weight_decay": settings.weight_decay,
        "lr_scheduler_type": settings.lr_scheduler,
        "max_grad_norm": settings.max_grad_norm,
        "logging_steps": settings.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps" if save else "no",
        "save_steps": settings.save_steps if save else 500,
        "save_total_limit": settings.save_total_limit,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": (settings.save_steps or settings.logging_steps) if has_eval else None,
        **trainer_safety_args(settings.device, settings.seed),
        # Data: conversational samples, loss on assistant turns (answer + <|im_end|>) only.
        "assistant_only_loss": True,
        "max_length": settings.max_length,
        "packing": settings.packing,
        "packing_strategy": "bfd",
        # answer_nll replaces the forward TRL patches for chunked_nll, and returns the same fields.
        "loss_type": "chunked_nll" if settings.loss_type == ANSWER_NLL else settings.loss_type,
    }
    if not settings.packing:
        # transformers 5 replaced group_by_length=True by train_sampling_strategy.
        kwargs["train_sampling_strategy"] = "group_by_length"
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def _messages(sample: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in sample["messages"]]


def fitting_samples(
    samples: Sequence[dict[str, Any]], tokenizer, max_length: int | None
) -> list[dict[str, Any]]:
    """Samples whose whole chat fits ``max_length`` tokens.

    TRL would cut longer ones (keep_start): the answer loses its tail and its <|im_end|>, which teaches
    truncated JSON and no stop; an answer cut away entirely is dropped by TRL anyway.
    """
    if max_length is None:
        return list(samples)
    kept = []
    for start in range(0, len(samples), 512):
        chunk = samples[start : start + 512]
        ids = tokenizer.apply_chat_template([_messages(s) for s in chunk], tokenize=True, return_dict=False)
        kept.extend(sample for sample, tokens in zip(chunk, ids, strict=True) if len(tokens) <= max_length)
    return kept


def _chat_dataset(samples: Sequence[dict[str, Any]]):
    from datasets import Dataset

    # Only the messages travel: other fields (schema) vary in structure and would upset Arrow.
    return Dataset.from_list([{"messages": _messages(s)} for s in samples])


def _lm(model):
    return model.get_base_model() if is_peft(model) else model


def _unpatch_forward(model, patched_before: bool) -> None:
    """Undo the loss's ``forward`` patch (TRL's chunked one or chatuie.answer_loss's, an instance
    attribute): with it, a later ``model(..., labels=...)`` returns ``logits=None``."""
    target = _lm(model)
    if not patched_before and "forward" in target.__dict__:
        del target.__dict__["forward"]


def sft_trainer(
    model,
    tokenizer,
    samples: Sequence[dict[str, Any]],
    settings: TeachSettings,
    output_dir: str | Path,
    *,
    eval_samples: Sequence[dict[str, Any]] | None = None,
    callbacks: list | None = None,
    **config_overrides: Any,
):
    """TRL's ``SFTTrainer`` as :func:`train_chat` builds it (samples already fitting ``max_length``);
    bench/train.py times it against a bare loop over its own batches."""
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=sft_config(settings, output_dir, has_eval=bool(eval_samples), **config_overrides),
        train_dataset=_chat_dataset(samples),
        eval_dataset=_chat_dataset(eval_samples) if eval_samples else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if settings.loss_type == ANSWER_NLL:
        patch_answer_loss(_lm(model))  # over TRL's chunked-loss patch; _unpatch_forward removes either
    return trainer


def train_chat(
    model,
    tokenizer,
    samples: Sequence[dict[str, Any]],
    settings: TeachSettings,
    output_dir: str | Path,
    *,
    eval_samples: Sequence[dict[str, Any]] | None = None,
    resume: bool = True,
    callbacks: list | None = None,
    **config_overrides: Any,
) -> TrainResult:
    """Causal-LM training on chat samples, loss on the assistant turns, resumable.

    If ``output_dir`` holds a complete checkpoint (and ``resume``), training continues from the newest one
    (weights, optimizer, scheduler, RNG, data position, global step, log history); raise
    ``settings.max_steps`` to train further. Checkpoint folders newer than that one (interrupted
    writes) are removed; with ``resume=False`` every existing checkpoint is removed (a fresh run).
    Samples longer than ``settings.max_length`` tokens are left out (counted in ``too_long``).
    Works for full models and peft (LoRA) models alike; the trained model is returned (same object).
    ``config_overrides`` go to :func:`sft_config` (any ``SFTConfig`` field).
    """
    if not samples:
        raise ValueError("no training samples")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = last_checkpoint(out) if resume else None
    if is_main_process():  # data-parallel: rank 0 alone removes folders (chatuie.launch)
        _drop_incomplete_after(out, checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fitting = fitting_samples(samples, tokenizer, settings.max_length)
    too_long = len(samples) - len(fitting)
    if too_long:
        logger.warning(
            "%d of %d samples exceed max_length=%d tokens: left out",
            too_long,
            len(samples),
            settings.max_length,
        )
    if not fitting:
        raise ValueError(f"no training sample fits max_length={settings.max_length}")
    eval_fitting = fitting_samples(eval_samples, tokenizer, settings.max_length) if eval_samples else None
    patched_before = "forward" in _lm(model).__dict__
    trainer = sft_trainer(
        model, tokenizer, fitting, settings, out, eval_samples=eval_fitting, callbacks=callbacks,
        **config_overrides,
    )
    finished = _finished_state(checkpoint, settings.max_steps)
    try:
        if finished is not None:
            # The run is complete: hand back its weights. (transformers' resume at the last step of
            # a mid-epoch run would train one step more, and every rerun one more again.)
            logger.info("%s already reached max_steps=%d: no training", checkpoint, settings.max_steps)
            trainer._load_from_checkpoint(str(checkpoint))
            log_history, global_step = finished["log_history"], int(finished["global_step"])
        else:
            if checkpoint is not None:
                logger.info("resuming from %s", checkpoint)
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            log_history, global_step = trainer.state.log_history, trainer.state.global_step
    finally:
        _unpatch_forward(model, patched_before)
    loss_log = [
        {"step": int(entry["step"]), "loss": float(entry["loss"])}
        for entry in log_history
        if "loss" in entry and "step" in entry
    ]
    tokenizer.padding_side = "left"  # back to generation's side
    model = trainer.model
    model.eval()
    resumed_from = str(checkpoint) if checkpoint else None
    return TrainResult(model, loss_log, global_step, resumed_from, too_long)


def teach_to_answer(
    model,
    tokenizer,
    samples: Sequence[dict[str, Any]],
    settings: TeachSettings,
    output_dir: str | Path,
    **kwargs: Any,
) -> TrainResult:
    """Teach a (base) model to answer chat samples: :func:`train_chat` under its stage's name."""
    return train_chat(model, tokenizer, samples, settings, output_dir, **kwargs)


def train_sft(
    model,
    tokenizer,
    samples: Sequence[dict[str, Any]],
    settings: TeachSettings,
    output_dir: str | Path,
    **kwargs: Any,
) -> TrainResult:
    """Supervised fine-tuning on IE instructions: :func:`train_chat` (LoRA when the model is a peft model)."""
    return train_chat(model, tokenizer, samples, settings, output_dir, **kwargs)
