"""Checkpoints without the frozen backbone.

A checkpoint keeps only trainable weights (and their optimizer state) plus a description
of the backbone (fingerprints of its weights, ControlNets and LoRAs; layers; variants), so
no Stable Diffusion weights are copied into it; its size is that of the heads (a few MB on
the tiny backbone, GBs for the paper's gate at SD 1.5 widths: see docs/guides/segmentation.md). Loading it
beside other weights or another feature configuration fails with a message saying what differs.
An exported head (csdiff/tasks/export.py: weights and config, no optimizer state) loads the same way.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from csdiff.backbone.extractor import DiffusionFeatureExtractor, describe_differences
from csdiff.backbone.variants import as_variant

FROZEN_PREFIX = "extractor."
DESCRIPTION_KEY = "csdiff_backbone"
# Options that make the extractor. With a checkpoint that describes its features, where the
# weights lie (paths below) may differ: the config's are used and the description check
# (on_load_checkpoint) compares the weights by content. Every other difference is refused.
EXTRACTOR_OPTIONS = ("backbone", "variants", "layers", "attention_variant")
WEIGHT_LOCATIONS = frozenset({"backbone.model", "backbone.base_model", "backbone.unet"})
# Options that cannot change a trained model's results: the config's value is used. dtype
# changes features by rounding only, like batching; the description check ignores it too.
NEUTRAL_OPTIONS = frozenset(
    {"feature_cache", "backbone.batch_variants", "backbone.channels_last", "backbone.compile", "backbone.dtype"}
)
# Options read only while training: neutral for validate, test and predict (not when resuming a fit).
TRAINING_OPTIONS = frozenset(
    {"lr", "text_encoder_lr", "weight_decay", "poly_power", "min_lr", "train_noise", "dropout", "gate_sparsity"}
)


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


def class_name(class_path: str) -> str:
    """``csdiff.tasks.SegmentationTask`` → ``SegmentationTask`` (a class is exported from several modules)."""
    return class_path.rpartition(".")[2]


def check_checkpoint_task(ckpt: Any, saved_class: str | None, config_class: str | None) -> None:
    """Refuse a checkpoint of another task (e.g. a correspondence checkpoint in a segmentation
    config): Lightning would build the checkpoint's task and feed it the config's data."""
    if saved_class is None or config_class is None or class_name(saved_class) == class_name(config_class):
        return
    saved, wanted = class_name(saved_class), class_name(config_class)
    raise CheckpointMismatchError(
        f"{ckpt} is a {saved} checkpoint; this config builds a {wanted}. Use a {wanted} checkpoint, or the config "
        f"the {saved} was trained with (its run folder's config.yaml)"
    )


def task_class(class_path: str | None) -> type:
    """The class a ``class_path`` names (``object`` when it names none)."""
    module, _, name = (class_path or "").rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return object
    return found if isinstance(found, type) else object


def _plain(value: Any) -> Any:
    """Tuples as lists and mappings as dicts, so that a config's value compares with a checkpoint's."""
    if isinstance(value, Mapping) or hasattr(value, "as_dict"):
        items = value.as_dict() if hasattr(value, "as_dict") else value
        return {k: _plain(v) for k, v in items.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _extractor_defaults() -> dict[str, Any]:
    """What a backbone option left out of a task's ``backbone`` means: the extractor's default."""
    parameters = inspect.signature(DiffusionFeatureExtractor.__init__).parameters.values()
    return {p.name: _plain(p.default) for p in parameters if p.default is not inspect.Parameter.empty}


def _variant_fields(variant: Mapping[str, Any] | None, name: str = "attention") -> dict[str, Any]:
    """A variant with its defaults filled in and its weight locations (LoRA paths, ControlNet
    models, merged weights) left out: those are compared by content when the weights load."""
    if variant is None:
        return {}
    try:
        fields = as_variant({"name": name, **variant}).to_dict()
    except (TypeError, ValueError):  # refused with its own message when the task is built
        return dict(variant)
    fields.pop("weights", None)
    fields["loras"] = [{k: v for k, v in lora.items() if k != "path"} for lora in fields["loras"]]
    fields["controlnets"] = [{k: v for k, v in cn.items() if k != "model"} for cn in fields["controlnets"]]
    return fields


def _variant_differences(key: str, old: Any, new: Any) -> list[str]:
    """``variants`` (``None``: one plain variant, as the tasks take it) or ``attention_variant``,
    one line per differing field, worded as the description check words them."""
    if key == "variants":
        old, new = (_plain(v) or [{"name": "plain"}] for v in (old, new))
    else:
        old, new = [old] if old else [], [new] if new else []
    a, b = [_variant_fields(v) for v in old], [_variant_fields(v) for v in new]
    if [v.get("name") for v in a] != [v.get("name") for v in b]:
        return [f"{key}: {[v.get('name') for v in a]} (checkpoint) vs {[v.get('name') for v in b]} (config)"]
    return [
        f"variant {x.get('name')!r} {field}: {value} (checkpoint) vs {y.get(field)} (config)"
        for x, y in zip(a, b)
        for field, value in x.items()
        if y.get(field) != value
    ]


def _differences(key: str, old: Any, new: Any, neutral: frozenset[str], described: bool) -> list[str]:
    """Lines for one option given explicitly, compared with the checkpoint's value."""
    extractor = described and key in EXTRACTOR_OPTIONS
    if extractor and key in ("variants", "attention_variant"):
        return _variant_differences(key, old, new)
    if isinstance(new, dict) and isinstance(old, (dict, type(None))):  # dict options compare key by key
        defaults = _extractor_defaults() if extractor and key == "backbone" else {}
        old = {**defaults, **(old or {})}
        skip = neutral | (WEIGHT_LOCATIONS if extractor else frozenset())
        return [
            f"{key}.{sub}: {old.get(sub, 'not set')} (checkpoint) vs {value} (config)"
            for sub, value in new.items()
            if f"{key}.{sub}" not in skip and old.get(sub, "not set") != value
        ]
    if key in neutral or old == new:
        return []
    return [f"{key}: {'not set (the task default)' if old is None else old} (checkpoint) vs {new} (config)"]


def reconcile_options(
    given: Mapping[str, Any], saved: Mapping[str, Any], neutral: frozenset[str], described: bool
) -> tuple[dict, list[str]]:
    """Compare the task options a config gives explicitly with a checkpoint's hyperparameters.

    Lightning builds a task from its checkpoint's hyperparameters and silently drops what the
    config says. Returns the config's values to use over the checkpoint's (neutral options;
    with a ``described`` checkpoint also the extractor's options, whose weight locations may
    differ) and one line per other difference, to refuse. ``backbone`` compares key by key
    (a key the checkpoint left out has the extractor's default), variants field by field.
    """
    use: dict[str, Any] = {}
    refuse: list[str] = []
    for key, value in _plain(dict(given)).items():
        if key not in saved:  # not a hyperparameter (feature_cache): the config's value stands anyway
            continue
        old = _plain(saved[key])
        lines = _differences(key, old, value, neutral, described)
        refuse += lines
        if not lines and value != old:
            use[key] = (
                {**(old or {}), **value} if isinstance(value, dict) and isinstance(old, (dict, type(None))) else value
            )
    return use, refuse


def check_given_options(ckpt: Any, refuse: list[str]) -> None:
    """One line naming every option the config gives otherwise than the checkpoint."""
    if refuse:
        raise CheckpointMismatchError(
            f"the checkpoint {ckpt} was trained with other options than this config gives: {'; '.join(refuse)}. "
            f"Leave them out (the checkpoint's values apply) or use the config it was trained with (its run folder's config.yaml)"
        )


def options_over_checkpoint(
    checkpoint: Mapping[str, Any], given: Mapping[str, Any], class_path: str | None, verb: str, shown: Any
) -> dict[str, Any]:
    """The task options of a config to use over a checkpoint's hyperparameters, which
    Lightning's CLI puts in place of the config's (``given``: the options the config and
    command line give explicitly; ``shown``: the checkpoint as the user named it).

    Raises when the checkpoint belongs to another task than ``class_path``, or when the config
    gives an option otherwise that changes results (training-only options do not, except for ``fit``).
    """
    saved = dict(checkpoint.get("hyper_parameters") or {})
    saved_class = saved.pop("_class_path", None)
    saved.pop("_instantiator", None)
    check_checkpoint_task(shown, saved_class, class_path)
    described = DESCRIPTION_KEY in checkpoint and issubclass(
        task_class(saved_class or class_path), FrozenBackboneCheckpointMixin
    )
    neutral = NEUTRAL_OPTIONS | (TRAINING_OPTIONS if verb != "fit" else frozenset())
    use, refuse = reconcile_options(given, saved, neutral, described)
    check_given_options(shown, refuse)
    return use
