"""ab-test's schedule (pure): rounds of randomized mirror-order blocks, one block per setting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slot:
    """One llama-bench call in the schedule."""

    round: int
    block: int
    slot: int  # position inside the block
    setting: str  # Setting.id
    arm: int  # index into the arms


def block_order(n_arms: int, rng: np.random.Generator) -> list[int]:
    """A random permutation followed by its mirror image (ABBA / BAAB for two arms): every arm sits at
    the same mean position, so a linear drift inside a block favours none of them."""
    perm = [int(i) for i in rng.permutation(n_arms)]
    return perm + perm[::-1]


def round_slots(round_index: int, settings: Sequence[str], n_arms: int, rng: np.random.Generator,
                first_block: int) -> list[Slot]:
    """One round: one mirror block per setting, settings in random order."""
    slots: list[Slot] = []
    order = [settings[int(i)] for i in rng.permutation(len(settings))]
    for b, setting in enumerate(order):
        for pos, arm in enumerate(block_order(n_arms, rng)):
            slots.append(Slot(round_index, first_block + b, pos, setting, arm))
    return slots


def make_schedule(n_rounds: int, settings: Sequence[str], n_arms: int, seed: int) -> list[Slot]:
    """The whole schedule for a fixed number of rounds (the stop rule builds it round by round with the
    same generator, so a run with --max-time is a prefix of the run with enough --rounds)."""
    rng = np.random.default_rng(seed)
    slots: list[Slot] = []
    for r in range(n_rounds):
        slots.extend(round_slots(r, settings, n_arms, rng, r * len(settings)))
    return slots

