"""Exported heads: a trained task in a folder, without the backbone and without optimizer state.

A `csdiff fit` checkpoint carries AdamW's two moments beside the weights (together 3× their
size) and Lightning's loop and callback state, which only resuming a fit needs. An exported
head keeps what inference needs:

- ``weights.safetensors``: the trainable weights (tensors only: nothing to unpickle);
- ``task.yaml``: the task's class and arguments (the checkpoint's hyperparameters, which name
  the backbone to load), the checkpoint's description of the features it was trained on
  (``csdiff_backbone``: weight fingerprints, layers, variants, timestep, ...) and the csdiff version.

The backbone's weights are never in it: they are loaded from where ``task.yaml`` names them
(edit that path on another machine: weights are recognised by content), and the description
makes the head refuse other weights or another feature configuration, as a checkpoint does.

Loading turns the folder back into a regular Lightning checkpoint file in a temporary folder
(:func:`temporary_checkpoint`), so `csdiff test/predict --ckpt_path FOLDER` and
``Task.load_from_checkpoint(FOLDER)`` run exactly Lightning's and csdiff's checkpoint code:
same hyperparameters, same checks, same weights, hence the same predictions.
"""

from __future__ import annotations

import contextlib
import pickle
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from csdiff import __version__
from csdiff.io import save_tensors, save_text
from csdiff.resume import CheckpointError, check_checkpoint_file
from csdiff.tasks.checkpoints import DESCRIPTION_KEY, FROZEN_PREFIX

TASK_FILE = "task.yaml"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "csdiff-head/1"
# `csdiff fit` (LightningCLI) saves these two keys among the hyperparameters; a rebuilt
# checkpoint carries them too, so Lightning instantiates the task exactly as from the .ckpt.
CLASS_KEY, INSTANTIATOR_KEY = "_class_path", "_instantiator"
CLI_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
_HEADER = (
    "# A trained csdiff head, exported by checkpoints_scripts/export_head.py (no backbone weights,\n"
    "# no optimizer state). Use: csdiff test|predict --config <data config> --ckpt_path <this folder>,\n"
    "# or <Task>.load_from_checkpoint(<this folder>). On another machine, point\n"
    "# model.init_args.backbone.model (and ControlNet/LoRA paths) at the same weights there.\n"
)


@dataclass(frozen=True)
class ExportedHead:
    """What :func:`export_head` wrote, with sizes for the user."""

    folder: Path
    tensors: int
    weights_bytes: int
    checkpoint_bytes: int


def _plain(value: Any, where: str) -> Any:
    """``value`` as YAML-safe plain data (tuples become lists); refuses anything else."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise CheckpointError(f"{where} is a {type(value).__name__}, which an exported head's YAML cannot hold")


def read_csdiff_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by `csdiff fit`, memory-mapped; a one-line CheckpointError for anything else."""
    if is_exported_head(path):
        raise CheckpointError(
            f"{path} is an exported head already; export_head reads a .ckpt file written by `csdiff fit`"
        )
    check_checkpoint_file(path, hint="pass a .ckpt file written by `csdiff fit` (e.g. <run>/checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds pickled objects other than tensors and plain values, so it is no csdiff checkpoint"
        ) from err
    hparams = checkpoint.get("hyper_parameters") or {}
    if DESCRIPTION_KEY not in checkpoint or CLASS_KEY not in hparams:
        missing = DESCRIPTION_KEY if DESCRIPTION_KEY not in checkpoint else f"hyper_parameters[{CLASS_KEY!r}]"
        raise CheckpointError(
            f"{path} is a Lightning checkpoint but not one written by `csdiff fit` (it has no {missing}); "
            f"export_head exports csdiff task checkpoints (e.g. <run>/checkpoints/last.ckpt)"
        )
    return checkpoint


def export_head(checkpoint_path: str | Path, out: str | Path) -> ExportedHead:
    """Write ``out/weights.safetensors`` and ``out/task.yaml`` from a `csdiff fit` checkpoint.

    Each file is written atomically, weights first; both carry the same export id, so a
    folder whose two files come from different exports (a killed overwrite) is refused.
    """
    checkpoint = read_csdiff_checkpoint(checkpoint_path)
    state = checkpoint["state_dict"]
    frozen = [k for k in state if k.startswith(FROZEN_PREFIX)]
    if frozen:  # csdiff never saves them; a checkpoint that holds them was not written by csdiff
        raise CheckpointError(
            f"{checkpoint_path} holds backbone weights ({frozen[0]}, ...); csdiff checkpoints hold trainable weights only"
        )
    hparams = dict(checkpoint["hyper_parameters"])
    class_path = hparams.pop(CLASS_KEY)
    hparams.pop(INSTANTIATOR_KEY, None)
    export_id = uuid.uuid4().hex
    task = {
        "format": FORMAT,
        "csdiff_version": __version__,
        "export_id": export_id,
        "source": {
            "checkpoint": Path(checkpoint_path).name,
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
        },
        "model": {"class_path": class_path, "init_args": _plain(hparams, "hyper_parameters")},
        DESCRIPTION_KEY: _plain(checkpoint[DESCRIPTION_KEY], DESCRIPTION_KEY),
    }
    out = Path(out)
    weights = save_tensors(out / WEIGHTS_FILE, state, metadata={"format": FORMAT, "export_id": export_id})
    save_text(out / TASK_FILE, _HEADER + yaml.safe_dump(task, sort_keys=False))
    return ExportedHead(out, len(state), weights.stat().st_size, Path(checkpoint_path).stat().st_size)


def is_exported_head(path: Any) -> bool:
    """Whether ``path`` names a folder written by :func:`export_head` (file objects: no)."""
    return isinstance(path, (str, Path)) and Path(path).is_dir() and (Path(path) / TASK_FILE).is_file()


def read_exported_head(folder: str | Path) -> dict[str, Any]:
    """The exported head as a Lightning checkpoint dict: what `trainer.test/predict(ckpt_path=...)`
    and ``load_from_checkpoint`` read (``state_dict``, ``pytorch-lightning_version``,
    ``hyper_parameters``) plus the backbone description that csdiff checks. No loop, callback
    or optimizer state: Lightning restores those only when present, and needs them only to
    resume a fit."""
    import lightning

    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder} has {TASK_FILE} but no {WEIGHTS_FILE}: export the checkpoint again")
    task = yaml.safe_load((folder / TASK_FILE).read_text())
    if not isinstance(task, dict) or task.get("format") != FORMAT or "model" not in task or DESCRIPTION_KEY not in task:
        raise CheckpointError(
            f"{folder / TASK_FILE} is not an exported csdiff head ({FORMAT}): export the checkpoint again"
        )
    with safe_open(str(weights), framework="pt") as f:
        written_with = (f.metadata() or {}).get("export_id")
    if written_with != task.get("export_id"):
        raise CheckpointError(
            f"{weights} and {TASK_FILE} in {folder} come from different exports: export the checkpoint again"
        )
    model = task["model"]
    hparams = {CLASS_KEY: model["class_path"], **(model.get("init_args") or {}), INSTANTIATOR_KEY: CLI_INSTANTIATOR}
    return {
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": load_file(str(weights)),
        "hyper_parameters": hparams,
        DESCRIPTION_KEY: task[DESCRIPTION_KEY],
    }


def write_checkpoint(folder: str | Path, path: str | Path) -> Path:
    """Save the exported head in ``folder`` as a Lightning checkpoint file at ``path``."""
    torch.save(read_exported_head(folder), path)
    return Path(path)


@contextlib.contextmanager
def temporary_checkpoint(folder: str | Path) -> Iterator[Path]:
    """The exported head as a checkpoint file that exists inside the ``with`` block."""
    with tempfile.TemporaryDirectory(prefix="csdiff-head-") as tmp:
        yield write_checkpoint(folder, Path(tmp) / f"{Path(folder).resolve().name}.ckpt")
