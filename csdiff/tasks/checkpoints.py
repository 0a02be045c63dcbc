"""Checkpoints without the frozen backbone.

A checkpoint keeps only trainable weights (and their optimizer state) plus a description
of the backbone (fingerprints of its weights, ControlNets and LoRAs; layers; variants), so
no Stable Diffusion weights are copied into it; its size is that of the heads (a few MB on
the tiny backbone, GBs for the paper's gate at SD 1.5 widths: see the README). Loading it
beside other weights or another feature configuration fails with a message saying what differs.
An exported head (csdiff/tasks/export.py: weights and config, no optimizer state) loads the same way.
"""

from __future__ import annotations

from typing import Any

from csdiff.backbone.extractor import describe_differences

FROZEN_PREFIX = "extractor."
DESCRIPTION_KEY = "csdiff_backbone"


class CheckpointMismatchError(ValueError):
    """A checkpoint trained with another backbone or another configuration."""


class FrozenBackboneCheckpointMixin:
    """For LightningModules holding a frozen ``self.extractor`` (a DiffusionFeatureExtractor)."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, which also takes a folder written by
        checkpoints_scripts/export_head.py: it is rebuilt as a checkpoint file first, so the
        hyperparameters, the checks below and the weights go through Lightning's own path."""
        from csdiff.tasks.export import is_exported_head, temporary_checkpoint

        if not is_exported_head(checkpoint_path):
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        with temporary_checkpoint(checkpoint_path) as path:
            return super().load_from_checkpoint(path, *args, **kwargs)

    def task_parameters(self) -> list:
        """The task's own trainable parameters: the frozen backbone never enters an optimizer."""
        return [p for name, p in self.named_parameters() if not name.startswith(FROZEN_PREFIX) and p.requires_grad]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIX)]:
            del state[key]
        checkpoint[DESCRIPTION_KEY] = self.extractor.describe()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(DESCRIPTION_KEY)
        current = self.extractor.describe()
        differences = [] if saved is None else describe_differences(saved, current)
        if differences:
            raise CheckpointMismatchError(
                f"the checkpoint was trained with other features: {'; '.join(differences)}. Use the config the "
                f"checkpoint was trained with (its hparams.yaml) and the same weights (the same files, from any path)"
            )
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(FROZEN_PREFIX)}
        state = checkpoint["state_dict"]
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        if missing or unexpected or wrong:
            details = "; ".join(
                f"{what}: {keys[:3]}{' …' if len(keys) > 3 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
                if keys
            )
            raise CheckpointMismatchError(
                f"the checkpoint's trainable weights do not fit this model ({details}); it was trained with "
                f"another configuration (layers, variants, gate, head or num_classes)"
            )
        state.update({k: v for k, v in self.state_dict().items() if k.startswith(FROZEN_PREFIX)})
