"""Rollouts under the grounding constraint: every sampled answer is valid JSON with spans of the text.

GRPO takes them through its ``rollout_func`` (:class:`ConstrainedRollout`), sampled by the decoding
loop (:mod:`chatuie.decoding.loop`, the head over the allowed tokens only). TRL's PPO generation
takes no logits processor, so the policy's ``generate`` is wrapped (:class:`ConstrainedPPOGeneration`);
it keeps ``generate``, since PPO's log-probs and KL need the whole head's logits at every step.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import torch

from chatuie.data.records import Schema
from chatuie.reward.model import PairTokenizer


def _generation_stops(model, tokenizer) -> list[int]:
    """The token ids ``model`` stops generating on now (a trainer may have narrowed them)."""
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])


class ConstrainedRollout:
    """GRPO ``rollout_func``: sample each prompt's completion under the grounding constraint.

    Prompts are recognised by their user turn (it holds the task, schema and text); the completion
    ids end at the first end-of-turn token (kept) or at ``max_new_tokens``.
    """

    def __init__(self, prompts: Sequence[dict[str, Any]], max_new_tokens: int, temperature: float) -> None:
        self.requests = {p["prompt"][-1]["content"]: _ie_request(p) for p in prompts}
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def __call__(self, prompts: list, trainer: Any) -> dict[str, Any]:
        from transformers import LogitsProcessorList

        from chatuie.decoding import IEConstraintProcessor

        tokenizer = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        encode = PairTokenizer(tokenizer)
        prompt_ids = [encode.prompt_ids(p) for p in prompts]
        width = max(len(ids) for ids in prompt_ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
        device = next(model.parameters()).device
        requests = [self.requests[p[-1]["content"]] for p in prompts]
        stops = _generation_stops(model, tokenizer)
        processor = IEConstraintProcessor(
            tokenizer, requests, prompt_length=width, max_new_tokens=self.max_new_tokens, eos_token_ids=stops
        )
        from chatuie.decoding.loop import Sampler, decode, supports_allowed_head

        if supports_allowed_head(model):  # the decoding loop: the head over the allowed tokens only
            vocab = model.get_output_embeddings().weight.shape[0]
            sequences = decode(
                model,
                input_ids.to(device),
                mask.to(device),
                functools.partial(processor.allowed_ids, vocab=vocab),
                max_new_tokens=self.max_new_tokens,
                eos_ids=stops,
                pad_id=pad,
                sampler=Sampler(do_sample=True, temperature=self.temperature),
            )
        else:
            with torch.no_grad():
                sequences = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=True,
                    temperature=self.temperature,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=pad,
                    eos_token_id=stops,
                    logits_processor=LogitsProcessorList([processor]),
                )
        completion_ids = []
        for row in sequences[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            completion_ids.append(row[: cut + 1] if cut is not None else row)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def _ie_request(prompt: dict[str, Any]):
    """The constraint's view of an RL prompt: its task, text and schema."""
    from chatuie.decoding import IERequest

    return IERequest(prompt["task"], prompt["text"], Schema.from_dict(json.loads(prompt["schema"])))


class ConstrainedPPOGeneration:
    """PPO rollouts under the grounding constraint, while the ``with`` block runs.

    TRL's PPOTrainer samples with ``policy.generate`` and takes the rollout log-probs from the scores
    it returns, which are the *processed* scores. The wrapper adds the constraint as a logits
    processor and hands back the raw logits / temperature instead, so the rollout log-probs, the KL
    to the reference and the PPO ratio all come from the same unconstrained policy (as GRPO's
    constrained rollouts do); only which tokens get sampled is constrained. Prompts are recognised
    by their token ids (TRL left-pads them and masks the padding).
    """

    def __init__(self, policy, tokenizer, prompts: Sequence[dict[str, Any]], max_new_tokens: int) -> None:
        encode = PairTokenizer(tokenizer)
        self.requests = {tuple(encode.prompt_ids(p["prompt"])): _ie_request(p) for p in prompts}
        self.policy, self.tokenizer, self.max_new_tokens = policy, tokenizer, max_new_tokens
        self.calls = 0  # constrained generate calls (a test checks the wrapper was used)

    def generate(self, *, input_ids, attention_mask, generation_config, **kwargs: Any):
        from transformers import LogitsProcessorList

        from chatuie.decoding import IEConstraintProcessor

        try:
            requests = [
                self.requests[tuple(ids[mask.bool()].tolist())]
                for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
            ]
        except KeyError:
            raise ValueError("constrained PPO rollout: a query is not one of the RL prompts") from None
        stops = _generation_stops(self.policy, self.tokenizer)
        processor = IEConstraintProcessor(
            self.tokenizer,
            requests,
            prompt_length=input_ids.shape[1],
            max_new_tokens=self.max_new_tokens,
            eos_token_ids=stops,
        )
        output = self._original(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([processor]),
            output_logits=True,
            **kwargs,
        )
        temperature = generation_config.temperature or 1.0
        output.scores = tuple(logits / temperature for logits in output.logits)
        self.calls += 1
        return output

    def __enter__(self) -> ConstrainedPPOGeneration:
        self._original = self.policy.generate
        self.policy.generate = self.generate  # an instance attribute: shadows the class's method
        return self

    def __exit__(self, *exc: object) -> None:
        del self.policy.generate
