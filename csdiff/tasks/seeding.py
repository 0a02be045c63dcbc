"""Training randomness as a function of (seed, step, rank), so resumed fits replay it exactly."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

# Keeps the torch stream apart from the data's numpy streams, which share the seed.
_TRAIN_RNG_STREAM = 2


class StepSeededMixin:
    """For LightningModules: reseed torch before every training step from (seed, global step, rank).

    On resume Lightning restores weights, optimizer and loop counters, but not the global RNG
    state. Reseeding per step keys dropout and fresh training noise on the step alone, so a
    fit resumed from any checkpoint, mid-epoch included (``--ckpt_path last``), trains exactly
    like an uninterrupted one. The seed is ``seed_everything``'s (0 without it); each DDP rank
    gets its own stream. (Reseeding happens at batch start, after the DataLoader iterator has
    drawn its base seed; data randomness is keyed on (seed, epoch, index) by the datasets.)
    """

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        seq = np.random.SeedSequence([seed, self.global_step, self.global_rank], spawn_key=(_TRAIN_RNG_STREAM,))
        torch.manual_seed(int(seq.generate_state(1, np.uint64)[0]))  # also seeds every CUDA device
