"""Resuming fits: find a run's ``last.ckpt``, check checkpoint files, stop cleanly on Ctrl-C
and SIGTERM (what ``kill``, ``timeout``, SLURM and Kubernetes send).

Lightning's own ``--ckpt_path last`` looks in the folder of the *new* logger version, finds
nothing there and trains from scratch after a warning. csdiff instead finds the newest
``last.ckpt`` under the logger's root, continues that run in its own folder, and refuses
when there is nothing to resume.
"""

from __future__ import annotations

import pickle
import signal
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

LAST = "last.ckpt"
# Lightning's other ckpt_path keywords, left to Lightning.
KEYWORDS = ("best", "hpc", "registry")
DEFAULT_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
CKPT_PATH_HINT = "pass a .ckpt file written by `csdiff fit` (e.g. <run>/checkpoints/last.ckpt), `last`, or a folder written by export_head.py"


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used; the message names it and what to pass instead."""


class Interrupted(Exception):
    """A run stopped by a signal at a batch boundary, leaving only complete files.

    ``exit_code`` is the shell's code for a death by that signal (130 for Ctrl-C, 143 for
    SIGTERM), so schedulers and scripts see a killed job, not a successful one; ``hint``
    says how to finish the work.
    """

    def __init__(self, signum: int, message: str, hint: str) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.hint = hint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class FitInterrupted(Interrupted):
    """Raised at a step boundary after Ctrl-C or SIGTERM, once ``last.ckpt`` holds that step."""

    def __init__(self, epoch: int, step: int, saved: list[str], signum: int = signal.SIGINT) -> None:
        where = ", ".join(saved) if saved else "nothing (no checkpoint callback with save_last)"
        super().__init__(
            signum,
            f"interrupted at epoch {epoch}, step {step} by {signal.Signals(signum).name}; saved {where}",
            "continue with the same command and --ckpt_path last",
        )


def find_last_checkpoint(root: str | Path) -> Path | None:
    """The most recently written ``last.ckpt`` under ``root``, or None."""
    found = [p for p in Path(root).rglob(LAST) if p.is_file()] if Path(root).is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's tensors and plain values, memory-mapped: a multi-GB file costs only its
    small pickle until a tensor is read."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def check_checkpoint_file(path: str | Path, hint: str = CKPT_PATH_HINT) -> None:
    """Raise a one-line CheckpointError unless ``path`` is a file saved by Lightning; the
    message ends with ``hint`` (what to pass instead).

    The file is memory-mapped, so a multi-GB checkpoint costs only its small pickle here.
    A file refused by ``weights_only`` loading passes unchanged: Lightning reports that itself.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} not found; {hint}")
    if path.is_dir():
        newest = find_last_checkpoint(path)
        what = "not a Lightning checkpoint nor an exported head (no task.yaml)"
        raise CheckpointError(f"{path} is a folder, {what}; {f'e.g. pass {newest}' if newest else hint}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (not a file saved by torch.save); {hint}")
    try:
        content = read_checkpoint(path)
    except pickle.UnpicklingError:
        return
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable Lightning checkpoint ({type(err).__name__}: {err}); {hint}"
        ) from err
    if not isinstance(content, dict) or "state_dict" not in content:
        raise CheckpointError(f"{path} is a PyTorch file but not a Lightning checkpoint (it has no state_dict); {hint}")


def logger_root(trainer_config: Any) -> tuple[Path, bool]:
    """The folder the configured logger puts its run folders in, and whether it versions them.

    ``trainer_config`` is the parsed ``trainer`` section. Without a logger, checkpoints go to
    ``default_root_dir/checkpoints``: one folder, no versions.
    """
    base = Path(trainer_config.get("default_root_dir") or ".")
    logger = trainer_config.get("logger")
    if logger is None or logger is True:
        return base / "lightning_logs", True  # Lightning's default logger
    if logger is False:
        return base, False
    init = logger.get("init_args") if hasattr(logger, "get") else None
    if init is None or init.get("save_dir") is None:
        raise CheckpointError(
            "--ckpt_path last: cannot tell where this logger keeps its runs; pass the checkpoint file instead"
        )
    return Path(init["save_dir"]) / (init.get("name") or ""), True


def locate_last(trainer_config: Any) -> tuple[Path, str | None]:
    """The checkpoint `--ckpt_path last` means, and the logger version (run folder) it belongs to.

    Raises when there is none: asked to resume, csdiff never silently starts over.
    """
    root, versioned = logger_root(trainer_config)
    last = find_last_checkpoint(root)
    if last is None:
        raise CheckpointError(
            f"--ckpt_path last: no {LAST} under {root}, so there is no run to resume; start a new fit "
            f"without --ckpt_path, or pass the checkpoint file (check the logger's save_dir)"
        )
    run = last.parent.parent if last.parent.name == "checkpoints" else None
    version = str(run.relative_to(root)) if versioned and run is not None and run != root else None
    return last, version


class StopRequests(Callback):
    """Notes a stop request of the stage ``stage`` for the loop's next batch boundary.

    Ctrl-C is caught by a handler of its own (a second Ctrl-C stops at once, through
    Lightning's KeyboardInterrupt shutdown). SIGTERM is Lightning's: its signal connector
    sets ``trainer.received_sigterm`` (and forwards the signal to the DDP processes it
    launched); its fit and evaluation loops then raise ``SIGTERMException`` at their own
    boundaries, its predict loop never does. Subclasses read both in their batch-end hooks.
    """

    stage = "fit"
    notice = "stopping at the end of this batch"

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print(f"\ncsdiff: Ctrl-C: {self.notice} (Ctrl-C again to stop at once)", flush=True)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == self.stage and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def received(self, trainer: Trainer) -> int | None:
        """The signal this process was asked to stop by (SIGTERM before Ctrl-C), or None."""
        if trainer.received_sigterm:
            return signal.SIGTERM
        return signal.SIGINT if self.requested else None


class SaveLastOnStop(StopRequests):
    """Writes ``last.ckpt`` whenever a fit stops: at its end, and on Ctrl-C or SIGTERM at the
    end of the step in progress (a second Ctrl-C stops at once; pressed during validation,
    the stop comes after the next training step).

    Checkpoint callbacks write ``last.ckpt`` on their own schedule (epochs, N steps), so
    the end of a fit between two of their saves would be lost. DataLoader workers ignore
    SIGINT (see the datamodule), so the step in progress still gets its data. Under DDP the
    ranks agree on the stop at each step, so all of them save the same step.

    A SIGTERM that arrives after a step's end (during validation, at an epoch's end) meets
    Lightning's own stop first: its ``SIGTERMException`` comes here through ``on_exception``,
    where ``last.ckpt`` is saved as Lightning's ``OnExceptionCheckpoint`` would (Lightning
    resumes such checkpoints: it restarts the interrupted validation) and ``stopped`` keeps
    what to report.
    """

    notice = "saving last.ckpt at the end of this step"

    def __init__(self) -> None:
        super().__init__()
        self.stopped: FitInterrupted | None = None

    @staticmethod
    def save_last(trainer: Trainer) -> list[str]:
        """Make sure every checkpoint callback that keeps a ``last.ckpt`` has one of this step;
        returns their paths. A callback's own record of its last save (also set by
        Lightning's saves) avoids writing the same step twice."""
        paths = []
        for callback in trainer.checkpoint_callbacks:
            if not (callback.save_last and callback.dirpath):
                continue
            if callback._last_global_step_saved != trainer.global_step or not Path(callback.last_model_path).is_file():
                callback.last_model_path = str(
                    Path(callback.dirpath) / LAST
                )  # saved state: a resumed run keeps writing here
                trainer.save_checkpoint(callback.last_model_path)
            paths.append(callback.last_model_path)
        return paths

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        signum = agreed_signal(trainer, self.received(trainer))
        if signum is not None:
            raise FitInterrupted(trainer.current_epoch, trainer.global_step, self.save_last(trainer), signum)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self.stopped = FitInterrupted(
                trainer.current_epoch, trainer.global_step, self.save_last(trainer), signal.SIGTERM
            )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save_last(trainer)


class StopPredicting(StopRequests):
    """Ends a predict loop (``csdiff extract``, ``csdiff predict``) after the batch in progress
    on Ctrl-C or SIGTERM, once the writers (callbacks before this one) have written it.

    No collective under DDP: ranks may hold one batch more than others, so each stops on its
    own signal (Lightning forwards SIGTERM to the processes it launched; Ctrl-C in a terminal
    reaches them all).
    """

    stage = "predict"
    notice = "stopping after the batch in progress (its files are written first)"

    def __init__(self, hint: str = "run the same command again") -> None:
        super().__init__()
        self.hint = hint
        self.batches = 0

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.batches += 1
        signum = self.received(trainer)
        if signum is not None:
            name = signal.Signals(signum).name
            raise Interrupted(signum, f"interrupted by {name} after {self.batches} batch(es)", self.hint)


def agreed_signal(trainer: Trainer, signum: int | None) -> int | None:
    """The stop signal any rank received (SIGTERM over Ctrl-C), the same on every rank."""
    if trainer.world_size == 1:
        return signum
    code = torch.tensor(float(signum or 0), device=trainer.strategy.root_device)
    code = trainer.strategy.reduce(code, reduce_op="max")
    return int(code.item()) or None


def sigterm_interruption(verb: str) -> Interrupted:
    """What a ``SIGTERMException`` of Lightning's loops means for ``csdiff VERB`` without a
    checkpoint to report: the run was killed, its results are incomplete."""
    return Interrupted(signal.SIGTERM, f"interrupted by SIGTERM; {verb} did not finish", "run the same command again")
