"""Checkpoints without the frozen backbone.

A checkpoint keeps only trainable weights plus a description of the backbone (its weights
fingerprint, ControlNets, layers, variants), so it is a few MB whatever the backbone size,
and loading it beside other weights or another architecture fails with a clear message.
"""

from __future__ import annotations

from typing import Any

FROZEN_PREFIX = "extractor."
DESCRIPTION_KEY = "csdiff_backbone"


class CheckpointMismatchError(ValueError):
    """A checkpoint trained with another backbone or another configuration."""


class FrozenBackboneCheckpointMixin:
    """For LightningModules holding a frozen ``self.extractor`` (a DiffusionFeatureExtractor)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIX)]:
            del state[key]
        checkpoint[DESCRIPTION_KEY] = self.extractor.describe()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(DESCRIPTION_KEY)
        current = self.extractor.describe()
        if saved is not None:
            for key in ("backbone", "controlnets", "layers", "img_size", "timestep"):
                if key == "backbone":
                    ok = saved[key]["weights_id"] == current[key]["weights_id"]
                else:
                    ok = saved[key] == current[key]
                if not ok:
                    raise CheckpointMismatchError(
                        f"the checkpoint was trained with {key} = {saved[key]} but this configuration has "
                        f"{current[key]}: use the config the checkpoint was trained with (its hparams.yaml) "
                        f"or the same backbone weights"
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
