"""The output head gets a contiguous input (chatuie.models.modeling._contiguous_head_input): a frozen
head fed a batch's strided last positions made torch run a batched product over a per-row copy of
the head weight (seconds and gigabytes a call on Gemma)."""

from __future__ import annotations

import pytest
import torch

from chatuie.models.modeling import load_saved
from tests.helpers.tiny_extractor import tiny_model_dir


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory):
    model, tokenizer = load_saved(tiny_model_dir(tmp_path_factory.mktemp("tiny")))
    return model.requires_grad_(False).eval(), tokenizer  # as a LoRA model's base and head are


def test_the_last_positions_reach_the_head_contiguous_with_the_same_scores(frozen) -> None:
    model, tokenizer = frozen
    seen: list[torch.Tensor] = []
    capture = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0]))
    batch = tokenizer(["Steve Jobs founded Apple.", "IBM"], return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            last = model(**batch, logits_to_keep=1).logits
            full = model(**batch).logits
    finally:
        capture.remove()
    assert seen[0].shape[:2] == (2, 1) and seen[0].is_contiguous()
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_the_hook_is_added_once(tmp_path_factory: pytest.TempPathFactory) -> None:
    model, _ = load_saved(tiny_model_dir(tmp_path_factory.mktemp("tiny")))
    from chatuie.models.modeling import _contiguous_head_input

    _contiguous_head_input(model)
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
