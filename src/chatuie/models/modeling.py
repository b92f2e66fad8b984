"""Models and tokenizers: the embedded tiny chat model, loading hub/local models (+LoRA), saving, generating.

Token scheme (ChatML, as Qwen2.5-Instruct):

* ``<|im_start|>`` / ``<|im_end|>`` open and close every turn; ``<|endoftext|>`` pads.
* ``tokenizer.eos_token`` is ``<|im_end|>`` (the token a generated answer stops on);
  ``tokenizer.pad_token`` is ``<|endoftext|>``; ``model.generation_config.eos_token_id`` lists both.
* The chat template wraps each assistant answer *and its* ``<|im_end|>`` in
  ``{% generation %}...{% endgeneration %}``, so ``return_assistant_tokens_mask=True`` (TRL's
  ``assistant_only_loss``) trains the answer and the stop token, nothing of the prompt.

Training on chat samples (TRL's ``SFTTrainer``, resumable checkpoints): :mod:`chatuie.train.trainer`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatuie.models.packaged import (
    GEMMA_CHAT_TEMPLATE,
    GEMMA_TURN_TOKENS,
    PACKAGED_PREFIX,
    installed_pin,
    materialize,
    packaged_name,
    read_pin,
)
from chatuie.models.precision import resolve_dtype

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
    # The adapters' initial weights are drawn from this seed: the model (and its adapter) exists
    # before a Trainer seeds anything, and an unseeded draw made every SFT run a different one.
    seed: int = 13


@dataclass
class ModelConfig:
    """The ``model`` section of params.yaml."""

    # "tiny" (embedded, built locally), a packaged model ("gemma3-270m", chatuie.models.packaged), a hub id,
    # or a local directory
    base: str = "tiny"
    # auto | float32 | bfloat16 | float16. auto: bfloat16 where this machine computes it natively,
    # else float32 (chatuie.models.precision; params.yaml's default). float32 here: the same numbers anywhere.
    dtype: str = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # hub/local models; None = transformers' default (sdpa)
    lora: LoraSettings | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


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


def _dtype(name: str, where: str = "model.dtype"):
    """The torch dtype for a dtype setting; ``auto`` is this machine's fast one (chatuie.models.precision)."""
    return _DTYPES[resolve_dtype(name, where=where)]


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
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(lora.seed)
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
    _contiguous_head_input(model)
    return model, tokenizer


def _contiguous_head_input(model) -> None:
    """Give the output head a contiguous input (once per head). A batch's last positions
    (``logits_to_keep=1``, the prefill of ``generate``) are a strided slice; for a head that needs
    no gradient (frozen under LoRA) torch's matmul cannot fold such a slice into one matrix product
    and runs a batched product over the head weight expanded and copied per row instead: 16 x
    262,144 x 640 for Gemma, ~5 GB and seconds a call (docs/experiments.md, "A frozen head")."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_chatuie_contiguous_input", False):
        return
    head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]) if args else None)
    head._chatuie_contiguous_input = True


def packaged_dtype(name: str) -> str:
    """The dtype a packaged model is converted in: ``model.dtype`` as resolved here (float16 asks
    for bfloat16 weights, cast on load)."""
    return "float32" if resolve_dtype(name, where="model.dtype") == "float32" else "bfloat16"


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
    base = (
        note.get("base") or json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
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
    _contiguous_head_input(model)
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
