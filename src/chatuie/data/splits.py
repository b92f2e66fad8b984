"""The held-out slice of the training splits: records the SFT model leaves out, so that reward data
is scored on records the model did not train on.

:func:`is_heldout` picks a record by a hash of its id, so the ``sft`` and ``reward_data`` stages agree
on it without sharing a file. Its output for a given id, fraction and seed must never change (tests
pin it): SFT runs already made depend on it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from chatuie.data.records import Record

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class HeldoutSplit:
    """Training records the SFT model leaves out, so reward data is scored on unseen records."""

    fraction: float = 0.1
    seed: int = 13

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"heldout fraction must be in [0, 1), got {self.fraction}")


def stable_unit(salt: str, seed: int, key: str) -> float:
    """A uniform number in [0, 1) from a hash: stable across runs, machines and record order."""
    digest = hashlib.sha256(f"{salt}:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(record_id: str, split: HeldoutSplit) -> bool:
    """Whether the record ``record_id`` is in the held-out slice (about ``split.fraction`` of ids)."""
    return split.fraction > 0 and stable_unit("heldout", split.seed, record_id) < split.fraction


def heldout_record_ids(records: Iterable[Record], fraction: float, seed: int) -> set[str]:
    """The ids of ``records`` in the held-out slice (see :func:`is_heldout`)."""
    split = HeldoutSplit(fraction, seed)
    return {r.id for r in records if is_heldout(r.id, split)}
