"""Activation names: one grammar per kind of denoiser (DESIGN §2, §7).

UNets: ``{down-level{L} | mid | up-level{L}}[-repeat{R}]-{res|vit}[...]-{suffix}`` plus samplers
and ``unet-in`` / ``unet-after-conv-in`` / ``unet-out``. Diffusion transformers (PixArt, SD3,
FLUX): ``vit-block{i}-{suffix}``, FLUX's ``single-block{i}-out``, plus ``dit-in`` /
``dit-after-patch-embed`` / ``dit-out``, image tokens on the patch grid. A name resolves to a module path on the stock diffusers model and a *kind*
that says how the feature is read.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Literal

from torch import nn

from csdiff.backbone.families import FAMILIES, SD, family_of

Kind = Literal["output", "input", "tokens", "self-map", "cross-map"]

# Aggregated attention features: cross-attention maps of two up-levels per UNet family (DESIGN §2),
# and their diffusion-transformer analogue, image-to-text attention averaged over chosen blocks.
UP_CROSS = "up_cross"
CROSS_MAPS = "cross_maps"
AGGREGATES = (UP_CROSS, CROSS_MAPS)
# SD 1.x / 2.x named sets (each family's, including SDXL's, are in csdiff.backbone.families).
LAYER_SETS = SD.layer_sets


class UnknownLayerError(ValueError):
    """A layer name that the model does not have."""


@dataclass(frozen=True)
class Activation:
    """Where a named activation lives and how it is read.

    ``module`` is the dotted path of the hooked module; ``kind``: ``output`` (a (B,C,H,W)
    output), ``input`` (the module's input, for ``unet-in``), ``tokens`` (a (B,HW,C) output of
    a transformer sub-module), ``self-map`` / ``cross-map`` (attention probabilities of the
    ``Attention`` module at ``module``). ``spatial`` is the module whose input size, divided by
    ``patch``, gives token-shaped outputs their H×W: a UNet level's ``Transformer2DModel``, or a
    diffusion transformer's patch embedding.
    """

    name: str
    module: str
    kind: Kind
    spatial: str | None = None
    patch: int = 1
    index: int = 0  # which element of a tuple output holds the image (SD3's blocks: (text, image))


_TRANSFORMER_PARTS: tuple[tuple[str, str, Kind], ...] = (
    ("out", "", "tokens"),
    ("self-q", ".attn1.to_q", "tokens"),
    ("self-k", ".attn1.to_k", "tokens"),
    ("self-v", ".attn1.to_v", "tokens"),
    ("cross-q", ".attn2.to_q", "tokens"),
    ("ffn-inner", ".ff.net.0", "tokens"),
    ("self-map", ".attn1", "self-map"),
    ("cross-map", ".attn2", "cross-map"),
)


def _block_activations(prefix: str, path: str, block: nn.Module) -> list[Activation]:
    acts: list[Activation] = []
    resnets = getattr(block, "resnets", None) or []
    attentions = getattr(block, "attentions", None) or []
    for r in range(max(len(resnets), len(attentions))):
        if r < len(resnets):
            res = f"{path}.resnets.{r}"
            acts.append(Activation(f"{prefix}-repeat{r}-res-out", res, "output"))
            acts.append(Activation(f"{prefix}-repeat{r}-res-increment", f"{res}.conv2", "output"))
        if r < len(attentions):
            attn = f"{path}.attentions.{r}"
            acts.append(Activation(f"{prefix}-repeat{r}-vit-out", attn, "output"))
            # DeepFloyd IF's levels hold plain Attention modules: their output only
            for i in range(len(getattr(attentions[r], "transformer_blocks", None) or [])):
                tb = f"{attn}.transformer_blocks.{i}"
                for suffix, sub, kind in _TRANSFORMER_PARTS:
                    acts.append(Activation(f"{prefix}-repeat{r}-vit-block{i}-{suffix}", tb + sub, kind, spatial=attn))
    return acts


_JOINT_PARTS: tuple[tuple[str, str, Kind, int], ...] = (
    ("self-q", ".attn.to_q", "tokens", 0),
    ("self-k", ".attn.to_k", "tokens", 0),
    ("self-v", ".attn.to_v", "tokens", 0),
    ("self-out", ".attn", "tokens", 0),
    # the joint softmax of the image queries, split at the text keys, each part renormalised
    ("self-map", ".attn", "self-map", 0),
    ("cross-map", ".attn", "cross-map", 0),
    ("ffn-out", ".ff", "tokens", 0),
    ("out", "", "tokens", 1),
)
# A diffusion transformer block's parts, in network order: (suffix, module below the block, kind,
# index of the image in a tuple output). The research code's names.
_DIT_PARTS: dict[str, tuple[tuple[str, str, Kind, int], ...]] = {
    # PixArt's BasicTransformerBlock: self-attention, cross-attention to T5, feed-forward.
    "pixart": (
        ("self-q", ".attn1.to_q", "tokens", 0),
        ("self-k", ".attn1.to_k", "tokens", 0),
        ("self-v", ".attn1.to_v", "tokens", 0),
        ("self-out", ".attn1", "tokens", 0),
        ("self-map", ".attn1", "self-map", 0),
        ("cross-q", ".attn2.to_q", "tokens", 0),
        ("cross-out", ".attn2", "tokens", 0),
        ("cross-map", ".attn2", "cross-map", 0),
        ("ffn-out", ".ff", "tokens", 0),
        ("out", "", "tokens", 0),
    ),
    # SD3's JointTransformerBlock and FLUX's double-stream FluxTransformerBlock: one joint attention
    # over image and text tokens (its image stream's q, k, v, output and maps; (image, text) out),
    # then the image stream's feed-forward; the block returns (text, image).
    "sd3": _JOINT_PARTS,
    "flux": _JOINT_PARTS,
}
# The image grid of a model whose input is already tokens (FLUX: packed 2×2 latent patches)
# comes from the latent's size, not from a module's input.
LATENT_GRID = "<latent>"


def _dit_activations(model: nn.Module) -> dict[str, Activation]:
    """Every activation name of a diffusion transformer (PixArt, SD3, FLUX), in network order."""
    name = family_of(model).name
    parts = _DIT_PARTS[name]
    if name == "flux":  # no patch-embedding module sees the latent: tokens arrive packed
        spatial, patch = LATENT_GRID, 2
        acts = [Activation("dit-after-patch-embed", "x_embedder", "tokens", spatial=spatial, patch=patch)]
    else:
        spatial, patch = "pos_embed", model.config.patch_size
        acts = [
            Activation("dit-in", "pos_embed", "input"),
            Activation("dit-after-patch-embed", "pos_embed", "tokens", spatial=spatial, patch=patch),
        ]
    for i in range(len(model.transformer_blocks)):
        acts += [
            Activation(f"vit-block{i}-{suffix}", f"transformer_blocks.{i}{sub}", kind, spatial, patch, index)
            for suffix, sub, kind, index in parts
        ]
    for i in range(len(getattr(model, "single_transformer_blocks", None) or [])):
        # FLUX's single-stream blocks run on text and image tokens together and return (text, image)
        acts.append(Activation(f"single-block{i}-out", f"single_transformer_blocks.{i}", "tokens", spatial, patch, 1))
    acts.append(Activation("dit-out", "proj_out", "tokens", spatial=spatial, patch=patch))
    return {a.name: a for a in acts}


def enumerate_activations(unet: nn.Module) -> dict[str, Activation]:
    """Every valid activation name of a denoiser (UNet or diffusion transformer), in network order."""
    if family_of(unet).grammar == "dit":
        return _dit_activations(unet)
    acts = [Activation("unet-in", "conv_in", "input"), Activation("unet-after-conv-in", "conv_in", "output")]
    for level, block in enumerate(unet.down_blocks):
        acts += _block_activations(f"down-level{level}", f"down_blocks.{level}", block)
        if getattr(block, "downsamplers", None):
            acts.append(
                Activation(f"down-level{level}-downsampler-out", f"down_blocks.{level}.downsamplers.0", "output")
            )
    acts += _block_activations("mid", "mid_block", unet.mid_block)
    for level, block in enumerate(unet.up_blocks):
        acts += _block_activations(f"up-level{level}", f"up_blocks.{level}", block)
        if getattr(block, "upsamplers", None):
            acts.append(Activation(f"up-level{level}-upsampler-out", f"up_blocks.{level}.upsamplers.0", "output"))
    acts.append(Activation("unet-out", "conv_out", "output"))
    return {a.name: a for a in acts}


def up_cross_problem(unet: nn.Module) -> str | None:
    """Why this UNet has no ``up_cross`` (an up-level it averages over is missing or has no
    cross-attention, e.g. a UNet built with plain ``UpBlock2D`` there), or None."""
    levels = family_of(unet).up_cross_levels
    if not levels and family_of(unet).grammar == "unet":
        return f"up_cross is not available for {family_of(unet).name} models (their attention is not SD's transformer layers)"
    if not levels:
        return (
            f"up_cross averages the cross-attention maps of UNet up-levels, and {family_of(unet).name} is a "
            f"diffusion transformer: use `cross_maps` (its blocks' image-to-text maps, averaged) or "
            f"`vit-block{{i}}-cross-map`"
        )
    for level in levels:
        block = unet.up_blocks[level] if level < len(unet.up_blocks) else None
        if block is None or not getattr(block, "attentions", None):
            what = (
                f"has no up-level{level}"
                if block is None
                else f"has no attention in up-level{level} ({type(block).__name__})"
            )
            return (
                f"up_cross averages the cross-attention maps of up-levels {', '.join(map(str, levels))}, but this UNet {what}; "
                f"choose other layers (`csdiff layers --model <model>` lists them)"
            )
    return None


def up_cross_maps(unet: nn.Module) -> dict[int, list[str]]:
    """Module paths of the cross-attention layers that make up ``up_cross``, per up-level
    (call only when :func:`up_cross_problem` finds none)."""
    out: dict[int, list[str]] = {}
    for level in family_of(unet).up_cross_levels:
        block = unet.up_blocks[level]
        out[level] = [
            f"up_blocks.{level}.attentions.{r}.transformer_blocks.{i}.attn2"
            for r, attn in enumerate(getattr(block, "attentions", None) or [])
            for i in range(len(attn.transformer_blocks))
        ]
    return out


def cross_maps_problem(unet: nn.Module) -> str | None:
    """Why this denoiser has no ``cross_maps`` (a UNet, or a transformer shallower than the
    family's chosen blocks), or None."""
    family = family_of(unet)
    if family.grammar != "dit":
        what = "use up_cross" if family.up_cross_levels else "it has no cross-attention maps to average"
        return f"cross_maps averages a diffusion transformer's blocks; {family.name} is a UNet: {what}"
    missing = [i for i in family.cross_map_blocks if i >= len(unet.transformer_blocks)]
    if missing:
        return (
            f"cross_maps averages blocks {', '.join(map(str, family.cross_map_blocks))} of {family.name} models, but "
            f"this one has {len(unet.transformer_blocks)}: name its maps instead (`vit-block{{i}}-cross-map`)"
        )
    return None


def cross_maps_activations(unet: nn.Module) -> list[Activation]:
    """The block maps (``vit-block{i}-cross-map``) that ``cross_maps`` averages (call only when
    :func:`cross_maps_problem` finds none)."""
    table = enumerate_activations(unet)
    return [table[f"vit-block{i}-cross-map"] for i in family_of(unet).cross_map_blocks]


def aggregate_problem(unet: nn.Module, name: str) -> str | None:
    """Why ``name`` (``up_cross`` or ``cross_maps``) is not available on this denoiser, or None."""
    return up_cross_problem(unet) if name == UP_CROSS else cross_maps_problem(unet)


def expand_layers(layers: str | Iterable[str], sets: dict[str, tuple[str, ...]] = LAYER_SETS) -> list[str]:
    """Expand named sets (``legacy``, ``practical``; a family's own ``sets``) in place, keeping the user's order."""
    if isinstance(layers, str):
        layers = [layers]
    out: list[str] = []
    for name in layers:
        for member in sets.get(name, (name,)):
            if member not in out:
                out.append(member)
    return out


def resolve_layers(unet: nn.Module, layers: str | Iterable[str]) -> list[str]:
    """Validate layer names against a UNet; unknown names fail with the closest valid ones."""
    family = family_of(unet)
    names = expand_layers(layers, family.layer_sets)
    for name in names:  # a set of another family, e.g. SD's `legacy` on a transformer
        if (
            name not in AGGREGATES
            and name not in family.layer_sets
            and any(name in f.layer_sets for f in FAMILIES.values())
        ):
            raise UnknownLayerError(
                f"{name!r} is a named layer set of other model families, not of {family.name} models; "
                f"{family.name}'s: {', '.join(family.layer_sets) or 'none'} (or name layers: `csdiff layers --model <model>`)"
            )
    if not names:
        raise UnknownLayerError("no layers given: name at least one activation (see `csdiff layers`)")
    valid = enumerate_activations(unet)
    for name in AGGREGATES:  # checked here: capturing would fail deep inside, on an empty stack of maps
        if name in names and (problem := aggregate_problem(unet, name)) is not None:
            raise UnknownLayerError(problem)
    for name in names:
        if name not in AGGREGATES and name not in valid:
            sets = family_of(unet).layer_sets
            close = difflib.get_close_matches(name, list(valid) + [*AGGREGATES, *sets], n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise UnknownLayerError(
                f"unknown layer name {name!r}{hint}. Run `csdiff layers --model <model>` to list all valid names."
            )
    return names
