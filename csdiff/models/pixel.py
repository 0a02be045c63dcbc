"""Per-pixel classifiers of the label-scarce task: gates over variants, the MLP of
DDPM-segmentation, an ensemble with majority vote, and upstream's early-stopping rule.

Upstream = yandex-research/ddpm-segmentation (``src/pixel_classifier.py``,
``train_interpreter.py``), itself adopted from nv-tlabs/datasetGAN_release. The paper's
gate = Darkbblue/diffusion-content-shift, ``scarce_segmentation_gate/segmentation/pixel_classifier.py``
and ``task-pixel.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csdiff.models.gate import sparsity_loss

GateKind = Literal["per_pixel", "per_channel"]


def _check_gate_input(features: Tensor, num_variants: int, channels: int) -> None:
    if features.ndim != 3 or tuple(features.shape[1:]) != (num_variants, channels):
        expected = (-1, num_variants, channels)
        raise ValueError(f"gate expects features shaped (P, V, C) = {expected}, got {tuple(features.shape)}")


class VariantChannelGate(nn.Module):
    """Fuses V variants of a pixel's feature: one learned logit per variant and channel, a
    softmax over variants, a weighted sum. (P, V, C) → (P, C).

    The weights are per channel, not per pixel (csdiff's lighter alternative to the paper's
    :class:`PixelVariantGate`): being the same at every pixel, the gate commutes with
    bilinear upsampling, so testing runs at native size. Zero logits start at the plain mean.
    """

    def __init__(self, num_variants: int, channels: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_variants, channels))

    def weights(self) -> Tensor:
        """(V, C), summing to 1 over V."""
        return self.logits.softmax(dim=0)

    def fuse(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(P, C) fused features and the (1, V, C) weights that fused them."""
        _check_gate_input(features, *self.logits.shape)
        weights = self.weights()
        return torch.einsum("pvc,vc->pc", features, weights), weights[None]

    def forward(self, features: Tensor) -> Tensor:
        return self.fuse(features)[0]


class PixelVariantGate(nn.Module):
    """The paper's label-scarce gate: every pixel weighs the variants channel by channel.
    (P, V, C) → (P, C).

    As the paper's ``pixel_classifier.weight_assigner`` (one assigner, ``weight_num=1`` in
    its ``task-pixel.py``): one MLP Linear(C→128) → ReLU → BatchNorm1d → Dropout(0.5, torch's
    default there) → Linear(128→C), shared by the variants, maps each variant's own feature of
    a pixel to C logits; a softmax over the variants gives the (P, V, C) weights, and the fused
    feature is the weighted sum. The MLP runs once per variant, so in training BatchNorm
    normalises each variant's batch by its own statistics, as there. Linear layers start as the
    paper's ``init_weights`` (N(0, 0.02), zero bias): near-uniform weights. Not linear in the
    features, so it cannot run at native size: testing gathers upsampled pixels.
    """

    def __init__(self, num_variants: int, channels: int, hidden: int = 128, dropout: float = 0.5) -> None:
        super().__init__()
        self.num_variants, self.channels = num_variants, channels
        self.assigner = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(),
            nn.BatchNorm1d(hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, channels),
        )
        for module in self.assigner:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def fuse(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(P, C) fused features and their (P, V, C) weights, summing to 1 over V."""
        _check_gate_input(features, self.num_variants, self.channels)
        logits = torch.stack([self.assigner(features[:, v]) for v in range(self.num_variants)], dim=1)
        weights = logits.softmax(dim=1)
        return (weights * features).sum(dim=1), weights

    def forward(self, features: Tensor) -> Tensor:
        return self.fuse(features)[0]


def gate_sparsity_loss(weights: Tensor, loss: Tensor) -> Tensor:
    """The paper's sparsity term for gate weights (P, V, C) (P may be 1), scaled to ``loss``.

    ``L_s = -mean_{p,c} ||w[p, :, c]||_2`` (csdiff's :func:`~csdiff.models.gate.sparsity_loss`;
    -1 when each channel picks one variant) times ``loss / |L_s|`` with both detached, as the
    paper's ``task-pixel.py`` adds it: its value is ``-loss``, so a weight ``s`` on it means
    "a fraction s of the classification loss", whatever the number of variants. (That code
    also gates its DDPM features, one source: weights 1, a constant +1 in ``|L_s|``; csdiff
    leaves them ungated, so the scale here is the gated variants' alone.)
    """
    term = sparsity_loss(weights.transpose(0, 1))
    return term * (loss.detach() / term.detach().abs())


class PixelMLP(nn.Sequential):
    """Upstream's pixel classifier: Linear → ReLU → BatchNorm1d, twice, then Linear.

    Widths 128 and 32, or 256 and 128 when there are 30 classes or more (upstream's wider
    variant, ``pixel_classifier`` with ``numpy_class >= 30``). BatchNorm follows the ReLU, as
    upstream has it. Init as upstream's ``init_weights()``: Linear weights ~ N(0, 0.02), biases
    0; its BatchNorm rule matches only ``BatchNorm2d``, so the BatchNorm1d layers keep PyTorch's
    defaults (scale 1, shift 0), as here.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        hidden = (128, 32) if num_classes < 30 else (256, 128)
        layers: list[nn.Module] = []
        width = in_features
        for out in hidden:
            layers += [nn.Linear(width, out), nn.ReLU(), nn.BatchNorm1d(out)]
            width = out
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)


class PixelMember(nn.Module):
    """One ensemble member: its own gate over the variants (``per_pixel``: :class:`PixelVariantGate`,
    the paper's; ``per_channel``: :class:`VariantChannelGate`), then its own MLP on the gated
    channels followed by the ungated extra channels."""

    def __init__(
        self, num_variants: int, channels: int, extra_channels: int, num_classes: int, gate: GateKind = "per_pixel"
    ) -> None:
        super().__init__()
        self.extra_channels = extra_channels
        self.gate_kind = gate
        if gate == "per_pixel":
            self.gate: nn.Module = PixelVariantGate(num_variants, channels)
        elif gate == "per_channel":
            self.gate = VariantChannelGate(num_variants, channels)
        else:
            raise ValueError(f"gate must be 'per_pixel' or 'per_channel', got {gate!r}")
        self.mlp = PixelMLP(channels + extra_channels, num_classes)

    def forward(self, features: Tensor, extra: Tensor | None = None) -> Tensor:
        return self.forward_with_weights(features, extra)[0]

    def forward_with_weights(self, features: Tensor, extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits (P, K) and the gate's weights ((P, V, C) per pixel, (1, V, C) per channel)."""
        fused, weights = self.gate.fuse(features)
        if self.extra_channels:
            if extra is None or extra.shape != (features.shape[0], self.extra_channels):
                got = None if extra is None else tuple(extra.shape)
                expected = (features.shape[0], self.extra_channels)
                raise ValueError(f"member expects extra features shaped {expected}, got {got}")
            fused = torch.cat([fused, extra], dim=1)
        elif extra is not None:
            raise ValueError(f"member was built without extra channels but got extra features {tuple(extra.shape)}")
        return self.mlp(fused), weights

    def forward_native(self, maps: Sequence[Tensor], extra: Sequence[Tensor], out_size: int) -> Tensor:
        """Logits (out_size², K), row-major, of every pixel of one image, from its native-size maps.

        Equal to ``forward`` on the bilinearly upsampled (``align_corners=False``) features, at a
        fraction of the cost: the gate and the first Linear act on each pixel linearly, and
        bilinear upsampling (weights summing to 1) commutes with them, so both run at native
        size and only the first hidden layer's channels are upsampled. ``maps``: per layer
        (V, C_l, h, w) in the gate's channel order; ``extra``: per extra layer (E_l, h, w).
        Per-channel gates only: a per-pixel gate is not linear in the features.
        """
        if self.gate_kind != "per_channel":
            raise ValueError("forward_native needs the per-channel gate; gather the pixels for a per-pixel gate")
        weights = self.gate.weights()
        first = self.mlp[0]
        hidden = first.bias.view(-1, 1, 1).repeat(1, out_size, out_size)
        start = 0
        for x, gated in [(x, True) for x in maps] + [(x, False) for x in extra]:
            width = x.shape[-3]
            columns = first.weight[:, start : start + width]
            fused = torch.einsum("vchw,vc->chw", x.float(), weights[:, start : start + width]) if gated else x.float()
            part = torch.einsum("oc,chw->ohw", columns, fused)
            hidden += F.interpolate(part[None], size=(out_size, out_size), mode="bilinear", align_corners=False)[0]
            start += width
        if start != first.in_features:
            raise ValueError(f"maps hold {start} channels but the member expects {first.in_features}")
        out = hidden.flatten(1).t()
        for layer in list(self.mlp)[1:]:
            out = layer(out)
        return out


class PixelEnsemble(nn.Module):
    """``num_members`` independently initialised members (upstream: 10), fused by majority vote."""

    def __init__(
        self,
        num_members: int,
        num_variants: int,
        channels: int,
        extra_channels: int,
        num_classes: int,
        gate: GateKind = "per_pixel",
    ) -> None:
        super().__init__()
        if num_members < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}")
        self.num_classes = num_classes
        self.gate = gate
        self.members = nn.ModuleList(
            PixelMember(num_variants, channels, extra_channels, num_classes, gate) for _ in range(num_members)
        )

    def forward(self, features: Tensor, extra: Tensor | None = None) -> Tensor:
        """(P, V, C) gated and (P, E) extra features → (M, P, num_classes) logits."""
        return torch.stack([member(features, extra) for member in self.members])

    def forward_native(self, maps: Sequence[Tensor], extra: Sequence[Tensor], out_size: int) -> Tensor:
        """(M, out_size², num_classes) logits of one image from native-size maps (per-channel
        gate only; see PixelMember)."""
        return torch.stack([member.forward_native(maps, extra, out_size) for member in self.members])

    @staticmethod
    def majority_vote(logits: Tensor) -> Tensor:
        """(M, P, K) logits → (P,) class ids: the class most members pick (their argmax).

        A tie goes to the smallest class id, so the vote is deterministic on any device
        (upstream's ``torch.mode`` leaves ties unspecified). Every class takes part: leaving
        ignored or unscored classes out is the metric's job.
        """
        votes = nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).sum(dim=0)
        return votes.argmax(dim=-1)  # argmax returns the first maximum


class EarlyStopper:
    """Upstream's stopping rule for one member (``train_interpreter.py``), defaults upstream's.

    Per training batch, from the first epoch after ``after_epoch`` on (0-based; upstream checks
    ``epoch > 3``): a loss strictly below the best so far becomes the best and resets the count,
    any other loss adds one; training stops once the count exceeds ``patience`` (50), i.e. after
    51 batches in a row without a new best. Upstream trains at most ``max_epochs`` (100) epochs,
    Adam lr 1e-3, batches of 64 pixels; the caller owns the loop and the epoch limit.
    """

    def __init__(self, after_epoch: int = 3, patience: int = 50, max_epochs: int = 100) -> None:
        self.after_epoch = after_epoch
        self.patience = patience
        self.max_epochs = max_epochs
        self.best = math.inf
        self.bad_batches = 0
        self.stopped = False

    def step(self, epoch: int, loss: float) -> bool:
        """Record one batch's loss; True once training should stop (and from then on)."""
        if self.stopped or epoch <= self.after_epoch:
            return self.stopped
        if loss < self.best:
            self.best, self.bad_batches = loss, 0
        else:
            self.bad_batches += 1
        self.stopped = self.bad_batches > self.patience
        return self.stopped
