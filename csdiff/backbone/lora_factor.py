"""Factor a merged checkpoint back into a LoRA: truncated SVD of W_merged − W_base per layer.

The paper released its LoRAs merged into whole checkpoints (DESIGN §8). A LoRA is cheaper to
use than a second model (one UNet, adapters switched per variant), so this recovers one: for
every Linear and Conv2d of the UNet and text encoder(s) whose weight changed, ΔW (a conv kernel
reshaped to (out, in·k·k)) is factored by SVD in float64 and cut to rank r, giving a kohya
LoCon module with alpha = r (scale 1): up = U_r·√Σ_r, down = √Σ_r·V_rᵀ (the singular values
split evenly, so that neither factor is tiny when stored in float16). A rank above
min(out, in·k·k) is clipped to it; a LoRA of rank ≤ r is recovered exactly (up to the rounding
of the merge itself).

Pure torch: no Lightning, no diffusers — the models are any ``nn.Module``s with the same
architecture, keyed by component (``unet``, ``text_encoder``, ``text_encoder_2``).

Errors. Per module, the error is that of the factors *as stored* (in the output dtype):
e = ‖ΔW − up·down‖_F, relative to ‖ΔW‖_F. Per module type and overall, errors are pooled:
sqrt(Σ e²) / sqrt(Σ ‖ΔW‖²) over the modules of that type (all of them) — the relative error of
all their deltas taken as one vector, so large deltas weigh more than small ones. In exact
arithmetic e² is the sum of the discarded σ² (Eckart–Young).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from csdiff.backbone.lora_files import LoRAPair

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class ArchitectureMismatch(ValueError):
    """Base and merged models whose modules or shapes differ: their difference is not a LoRA."""


@dataclass(frozen=True)
class ChangedLayer:
    """One Linear / Conv2d whose weight differs between the two models."""

    component: str
    path: str
    kind: str
    base: torch.Tensor
    merged: torch.Tensor


@dataclass(frozen=True)
class ModuleFactor:
    """A factored layer: kohya factors (down (r, in[, k, k]), up (out, r)) and its errors."""

    component: str
    path: str
    kind: str
    down: torch.Tensor
    up: torch.Tensor
    error_sq: float  # ‖ΔW − up·down‖²_F with the factors as stored
    delta_sq: float  # ‖ΔW‖²_F

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def relative_error(self) -> float:
        return (self.error_sq / self.delta_sq) ** 0.5 if self.delta_sq > 0 else 0.0


@dataclass
class Plan:
    """What differs between two models: factorable layers, and what a LoRA cannot carry."""

    changed: list[ChangedLayer]
    unchanged: int  # factorable layers with equal weights (or below ``min_change``)
    not_factorable: list[str] = field(default_factory=list)  # other changed tensors: biases, norms, embeddings


def factorable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv2d layers of a model, by path: what a kohya LoCon can adapt."""
    return {path: m for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def module_kind(component: str, path: str, layer: nn.Module) -> str:
    """The type a module's error is reported under: ``attention linear`` (Linear layers of the
    UNet's transformer blocks), ``linear`` (other UNet Linear layers: time embeddings),
    ``conv3x3`` / ``conv1x1`` (UNet convolutions by kernel), ``text-encoder linear``."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        kind = f"conv{kh}x{kw}"
    else:
        kind = "attention linear" if ".attentions." in f".{path}." else "linear"
    return kind if component == "unet" else f"{component.replace('_', '-')} {kind}"


def check_same_architecture(base: dict[str, nn.Module], merged: dict[str, nn.Module]) -> None:
    """Refuse models whose components, tensor names or shapes differ; the message names the first difference."""
    for component in sorted(set(base) | set(merged)):
        if component not in merged or component not in base:
            where = "base" if component in base else "merged model"
            raise ArchitectureMismatch(f"{component} exists only in the {where}")
        a, b = base[component].state_dict(), merged[component].state_dict()
        for key in a:
            if key not in b:
                raise ArchitectureMismatch(f"{component}.{key} is missing from the merged model")
            if a[key].shape != b[key].shape:
                raise ArchitectureMismatch(
                    f"{component}.{key} has shape {tuple(a[key].shape)} in the base and {tuple(b[key].shape)} in the merged model"
                )
        extra = [k for k in b if k not in a]
        if extra:
            raise ArchitectureMismatch(f"{component}.{extra[0]} is missing from the base")


def plan_factoring(base: dict[str, nn.Module], merged: dict[str, nn.Module], min_change: float = 0.0) -> Plan:
    """The layers to factor: every factorable layer whose weight changed (relative Frobenius change
    ‖ΔW‖/‖W‖ above ``min_change``; 0 keeps any change). Other changed tensors are listed apart."""
    check_same_architecture(base, merged)
    changed, unchanged, other = [], 0, []
    for component in [c for c in COMPONENTS if c in base] + sorted(set(base) - set(COMPONENTS)):
        layers = factorable_layers(base[component])
        weights = {f"{path}.weight" for path in layers}
        merged_state = merged[component].state_dict()
        for key, tensor in base[component].state_dict().items():
            if key not in weights and not torch.equal(tensor, merged_state[key]):
                other.append(f"{component}.{key}")
        for path, layer in layers.items():
            w_base, w_merged = layer.weight.detach(), merged_state[f"{path}.weight"]
            if torch.equal(w_base, w_merged):
                unchanged += 1
                continue
            if min_change > 0:
                delta = (w_merged.double() - w_base.double()).norm()
                if delta <= min_change * w_base.double().norm():
                    unchanged += 1
                    continue
            changed.append(ChangedLayer(component, path, module_kind(component, path, layer), w_base, w_merged))
    return Plan(changed, unchanged, other)


def factor_delta(
    delta: torch.Tensor, rank: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(down, up, error², ‖ΔW‖²) of a weight difference at rank ``rank`` (clipped to the matrix's).

    The SVD runs in float64 on the tall orientation of the matrix: torch's LAPACK call is several
    times faster on a tall matrix than on its wide transpose (measured on one CPU core: 6 s instead
    of 24 s for a 1280×11520 kernel, SD 1.5's 3×3 convolutions at 1280 channels).
    The error is measured on the factors rounded to ``dtype``, as they will be stored."""
    out = delta.shape[0]
    matrix = delta.detach().reshape(out, -1).to("cpu", torch.float64)
    r = max(1, min(rank, *matrix.shape))
    if matrix.shape[0] >= matrix.shape[1]:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        v, s, uh = torch.linalg.svd(matrix.T.contiguous(), full_matrices=False)
        u, vh = uh.T, v.T
    root = s[:r].sqrt()
    up = (u[:, :r] * root).to(dtype)
    down = (root[:, None] * vh[:r]).to(dtype)
    error_sq = (matrix - up.double() @ down.double()).square().sum().item()
    return down.reshape(r, *delta.shape[1:]), up, error_sq, matrix.square().sum().item()


def factor_layer(layer: ChangedLayer, rank: int, dtype: torch.dtype = torch.float32) -> ModuleFactor:
    delta = layer.merged.double() - layer.base.double()
    down, up, error_sq, delta_sq = factor_delta(delta, rank, dtype)
    return ModuleFactor(layer.component, layer.path, layer.kind, down, up, error_sq, delta_sq)


def factor_all(
    plan: Plan,
    rank: int,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[Iterable[ChangedLayer]], Iterable[ChangedLayer]] = iter,
) -> list[ModuleFactor]:
    """Factor every changed layer (``progress`` wraps the iteration, e.g. ``tqdm``)."""
    return [factor_layer(layer, rank, dtype) for layer in progress(plan.changed)]


def as_lora(factors: list[ModuleFactor]) -> dict[str, dict[str, LoRAPair]]:
    """``{component: {path: (down, up, alpha = rank)}}``, what :func:`save_kohya_lora` writes."""
    out: dict[str, dict[str, LoRAPair]] = {}
    for f in factors:
        out.setdefault(f.component, {})[f.path] = (f.down, f.up, float(f.rank))
    return out


@dataclass(frozen=True)
class ErrorSummary:
    """Pooled relative error of a group of modules, and its worst module."""

    modules: int
    max_rank: int
    error: float
    worst: float
    worst_path: str


def summarize(factors: list[ModuleFactor]) -> dict[str, ErrorSummary]:
    """Pooled errors per module type (first-seen order), then ``overall`` over all modules."""
    groups: dict[str, list[ModuleFactor]] = {}
    for f in factors:
        groups.setdefault(f.kind, []).append(f)
    if factors:
        groups["overall"] = list(factors)
    out = {}
    for kind, members in groups.items():
        worst = max(members, key=lambda f: f.relative_error)
        delta_sq = sum(f.delta_sq for f in members)
        error = (sum(f.error_sq for f in members) / delta_sq) ** 0.5 if delta_sq > 0 else 0.0
        out[kind] = ErrorSummary(
            len(members), max(f.rank for f in members), error, worst.relative_error, f"{worst.component}.{worst.path}"
        )
    return out


def format_summary(summary: dict[str, ErrorSummary]) -> str:
    """The table the script prints: one line per module type, then ``overall``."""
    lines = [f"{'module type':<24} {'modules':>7} {'rank':>5} {'rel. error':>11} {'worst module':>12}"]
    for kind, s in summary.items():
        lines.append(f"{kind:<24} {s.modules:>7} {s.max_rank:>5} {s.error:>11.4e} {s.worst:>12.4e}  {s.worst_path}")
    return "\n".join(lines)
