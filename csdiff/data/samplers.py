"""Samplers shared by every datamodule: reproducible, DDP-sharded, resumable.

Training order is a pure function of (seed, epoch), so a resumed fit replays it; evaluation
is sharded across DDP ranks without padded duplicates, so dataset-level metrics summed over
ranks equal the single-process ones.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Sized
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

# Keeps the shuffle stream apart from the per-sample streams, which share (seed, epoch).
_SHUFFLE_STREAM = 1


def leave_signals_to_main(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which stops after the
    step or batch in progress: ``timeout``, SLURM and a terminal signal the whole process group,
    and a worker killed by it would fail that step instead (no last.ckpt).

    A SIGTERM from the worker's own parent still ends it: that is how the main process (and
    multiprocessing at interpreter exit) stops workers, and a worker deaf to it would leave the
    parent waiting forever. The sender is known only to ``sigwaitinfo``, so SIGTERM is blocked
    here, in the worker's only thread (workers are forked from one thread; threads started later
    inherit the mask), and a watcher thread takes it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's Python handler
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), name="csdiff-sigterm", daemon=True).start()


def _end_on_sigterm_from(parent: int) -> None:
    """Ignore SIGTERMs from anyone but ``parent``; on the parent's, die by it as before."""
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


def process_group() -> tuple[int, int]:
    """(world size, rank) of the initialised default process group; (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """Shuffle order as a pure function of (seed, epoch), so a resumed run replays it.

    ``set_epoch`` (which Lightning calls on samplers by itself) also tells the dataset,
    whose augmentations are keyed on the epoch.

    Under DDP (``num_replicas`` > 1; by default the world size of the initialised process
    group) rank r takes positions r, r+W, r+2W, ... of the one (seed, epoch) permutation, so
    the shards are disjoint. The permutation is padded with its own head to a multiple of W,
    as ``DistributedSampler`` does, because every rank must run the same number of steps.
    In one process the order is the permutation itself. Being a ``DistributedSampler``,
    Lightning uses it as is instead of wrapping it in its own (reshuffling) sampler.

    ``done_in_epoch(epoch)`` says how many of this rank's positions in ``epoch`` were trained
    on already; they are left out. A fit resumed from a mid-epoch checkpoint (every-N-steps
    saves, Ctrl-C) so continues the epoch where it stopped: Lightning counts the batches on
    but starts a fresh iterator. The length stays the whole epoch's, as Lightning expects.
    """

    def __init__(
        self,
        dataset: Sized,
        seed: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        done_in_epoch: Callable[[int], int] | None = None,
    ) -> None:
        world, own_rank = process_group()
        super().__init__(
            dataset,
            num_replicas=world if num_replicas is None else num_replicas,
            rank=own_rank if rank is None else rank,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        self.done_in_epoch = done_in_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        seq = np.random.SeedSequence([self.seed, self.epoch], spawn_key=(_SHUFFLE_STREAM,))
        order = np.random.default_rng(seq).permutation(len(self.dataset)).tolist()
        if self.num_replicas > 1:
            pad = self.total_size - len(order)
            if pad > 0 and order:
                order += (order * -(-pad // len(order)))[:pad]
            order = order[self.rank : self.total_size : self.num_replicas]
        # asked when iterating, after Lightning restored a resumed fit's progress
        done = self.done_in_epoch(self.epoch) if self.done_in_epoch is not None else 0
        return iter(order[done:])


class ShardedEvalSampler(DistributedSampler):
    """Evaluation order under DDP: rank r of W gets indices r, r+W, r+2W, ..., in order.

    No padding: every sample is scored exactly once over all ranks, so a dataset-level
    metric summed over ranks equals the single-process one; ranks may differ by one batch
    (W - 1 ranks hold one sample fewer when W does not divide the length). Being a
    ``DistributedSampler``, Lightning keeps it instead of its padding sampler.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        world, own_rank = process_group()
        super().__init__(
            dataset,
            num_replicas=world if num_replicas is None else num_replicas,
            rank=own_rank if rank is None else rank,
            shuffle=False,
            drop_last=False,
        )
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))


def fit_epoch(trainer: Any) -> int | None:
    """The epoch a fit is in (restored on resume), as Lightning passes it to ``set_epoch``;
    None without a trainer.

    A train loader must see it when it is built: Lightning creates the loader's first iterator
    before it calls ``set_epoch``, and with workers that iterator forks the dataset and draws
    its first indices at once (with none, indices are drawn lazily, after ``set_epoch``)."""
    progress = getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None)
    return None if progress is None else int(progress.current.processed)


def trained_in_epoch(trainer: Any, batch_size: int, epoch: int, num_samples: int | None = None) -> int:
    """Training samples of ``epoch`` this rank went through already, from the fit's step count:
    nonzero only in the first epoch of a fit resumed from a mid-epoch checkpoint.

    ``num_samples`` (this rank's samples per epoch) gives the batches per epoch while
    Lightning has not counted them yet: it asks a loader with workers for its first indices
    before it sets ``trainer.num_training_batches``."""
    if trainer is None:
        return 0
    batches = trainer.num_training_batches
    if batches == float("inf"):
        if num_samples is None:
            return 0
        batches, limit = -(-num_samples // batch_size), trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    accumulate = trainer.accumulate_grad_batches
    steps_per_epoch = -(-int(batches) // accumulate)
    return max(0, (trainer.global_step - epoch * steps_per_epoch) * accumulate * batch_size)
