"""Export a trained head: its weights and config, without the backbone and without optimizer state.

A `csdiff fit` checkpoint also holds AdamW's two moments (twice the weights' size) and
Lightning's loop state, which only resuming needs. The exported folder holds
``weights.safetensors`` (the trainable weights) and ``task.yaml`` (the task's class and
arguments, which name the backbone, the description of the features it was trained on and
the csdiff version); it is used wherever a checkpoint is:

    python checkpoints_scripts/export_head.py outputs/quickstart/version_0/checkpoints/last.ckpt heads/quickstart
    csdiff predict --config configs/quickstart.yaml --ckpt_path heads/quickstart
    SegmentationTask.load_from_checkpoint("heads/quickstart")
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from csdiff.cli import _quiet_libraries

_quiet_libraries()  # before csdiff.tasks imports transformers: its import-time notices are no errors

from csdiff.resume import CheckpointError  # noqa: E402
from csdiff.tasks.export import TASK_FILE, WEIGHTS_FILE, export_head  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Export; a checkpoint that is not csdiff's is refused with one line on stderr (exit code 1)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt file written by `csdiff fit`")
    parser.add_argument("out", type=Path, help=f"folder to write {WEIGHTS_FILE} and {TASK_FILE} into")
    args = parser.parse_args(argv)
    try:
        head = export_head(args.checkpoint, args.out)
    except CheckpointError as err:
        print(f"export_head: error: {err}", file=sys.stderr)
        return 1
    print(
        f"exported {head.tensors} tensors to {head.folder}: {WEIGHTS_FILE} {head.weights_bytes / 1e6:.1f} MB "
        f"(the checkpoint: {head.checkpoint_bytes / 1e6:.1f} MB); use it with --ckpt_path {head.folder}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
