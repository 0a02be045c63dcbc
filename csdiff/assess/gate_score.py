"""The GATE content-shift score: how far a feature map's contours drift from the clean image's.

"Content shift" is the drift of diffusion features away from the real image they were extracted
from (noise at a timestep, a prompt, a ControlNet, ...). The GATE guideline measures it on the
contours of the feature maps, so that a constant offset or a smooth change of scale, which a
linear head absorbs, does not count as shift:

* ``F_ref``: the features of the clean image (t = 0, no technique), the best we can hope for.
* contour map of ``F``: the Laplacian of each channel map (3×3 kernel [[0,1,0],[1,-4,1],[0,1,0]]),
  then the L2 norm over channels at each pixel.
* ``diff(F) = Σ_ij | ‖Lap(F_ref)_ij‖₂ − ‖Lap(F)_ij‖₂ |``: the contour maps' absolute difference,
  summed over pixels.
* an anchor feature ``F_anchor`` with a stronger shift (e.g. no technique at a larger timestep)
  gives the scale: ``score = (diff_anchor − diff) / diff_anchor``. 1 is a perfect match with
  ``F_ref``, 0 is as shifted as the anchor, negative is worse than the anchor.

Raw ``diff`` values depend on the layer, resolution and image, so they are only compared through
the anchor's; scores are averaged over images and compared with a (paired) percentile bootstrap,
because a handful of images can make one technique look better by chance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "bootstrap_mean_interval",
    "contour_difference",
    "gate_score",
    "laplacian_norm",
    "paired_bootstrap_difference",
    "verdict",
]

# Index rows drawn at once by the bootstrap: bounds its memory (~32 MB of int64 indices) for any N.
_BOOTSTRAP_INDICES_PER_CHUNK = 1 << 22


def laplacian_norm(features: Tensor) -> Tensor:
    """Contour map of a feature map: (B, C, H, W) -> (B, H - 2, W - 2).

    Each channel map is convolved with the 3×3 Laplacian kernel [[0,1,0],[1,-4,1],[0,1,0]] as a
    *valid* convolution: the border pixels have no full neighbourhood, and padding them (with zeros
    or a copy) would invent contours along the border that the image does not have. The L2 norm over
    channels then gives one contour strength per pixel.

    Computed in float32 at least (float64 input stays float64): SD features often come as float16,
    whose rounding (and overflow of squares) would swamp the small differences being measured. The
    kernel is applied by slicing rather than a grouped ``conv2d``: identical for any C and on CPU and
    CUDA, and it does not go through cuDNN, whose float32 convolutions may round inputs to TF32.
    """
    if features.dim() != 4:
        raise ValueError(
            f"features must be 4-D (B, C, H, W), got {features.dim()}-D with shape {tuple(features.shape)}"
        )
    height, width = features.shape[-2:]
    if height < 3 or width < 3:
        raise ValueError(
            f"features must be at least 3×3 spatially for a 3×3 Laplacian without padding, "
            f"got shape {tuple(features.shape)}"
        )
    x = features.to(torch.promote_types(features.dtype, torch.float32))
    centre = x[..., 1:-1, 1:-1]
    # x[i-1, j] + x[i+1, j] + x[i, j-1] + x[i, j+1] - 4 x[i, j]
    laplacian = x[..., :-2, 1:-1] + x[..., 2:, 1:-1] + x[..., 1:-1, :-2] + x[..., 1:-1, 2:] - 4 * centre
    return torch.linalg.vector_norm(laplacian, ord=2, dim=1)


def contour_difference(reference: Tensor, features: Tensor) -> Tensor:
    """GATE's ``diff``: Σ over pixels of |contour map of ``reference`` − contour map of ``features``|, (B,).

    Both must have the same (B, C, H, W) shape: contours are compared pixel by pixel, so features
    from another layer or resolution must not be silently broadcast against the reference.
    """
    if reference.shape != features.shape:
        raise ValueError(
            f"reference and features must have the same shape, got reference {tuple(reference.shape)} "
            f"and features {tuple(features.shape)}"
        )
    return (laplacian_norm(reference) - laplacian_norm(features)).abs().sum(dim=(-2, -1))


def gate_score(diff: Tensor, anchor_diff: Tensor) -> Tensor:
    """``(anchor_diff − diff) / anchor_diff`` elementwise: 1 matches the reference, 0 the anchor.

    Where ``anchor_diff`` is 0 the anchor has the reference's contours exactly, so there is no scale
    to measure against: the score is undefined. It is returned as NaN, never ±inf (which a nonzero
    ``diff`` over 0 would give and which would poison any mean), and ``bootstrap_mean_interval`` drops it.
    """
    diff = torch.as_tensor(diff)
    anchor_diff = torch.as_tensor(anchor_diff, device=diff.device)
    dtype = torch.promote_types(torch.promote_types(diff.dtype, anchor_diff.dtype), torch.float32)
    diff, anchor_diff = diff.to(dtype), anchor_diff.to(dtype)
    score = (anchor_diff - diff) / anchor_diff
    return torch.where(anchor_diff == 0, torch.full_like(score, float("nan")), score)


def _as_float_array(values: Tensor | np.ndarray | Sequence[float], name: str) -> np.ndarray:
    """A 1-D float64 numpy copy of ``values`` (tensor on any device, array or list)."""
    if isinstance(values, Tensor):
        array = values.detach().cpu().to(torch.float64).numpy()
    else:
        array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per image), got shape {array.shape}")
    return array


def _percentile_bootstrap(values: np.ndarray, level: float, resamples: int, seed: int) -> tuple[float, float, float]:
    """Mean of ``values`` (no NaN, N >= 1) and the percentile-bootstrap interval of that mean."""
    if not 0 < level < 1:
        raise ValueError(f"level must be strictly between 0 and 1, got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    n = len(values)
    if n == 0:
        raise ValueError("no values to bootstrap (empty, or all NaN)")
    mean = float(values.mean())
    if n == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOTSTRAP_INDICES_PER_CHUNK // n)
    means = np.concatenate(
        [
            values[rng.integers(0, n, size=(min(rows, resamples - start), n))].mean(axis=1)
            for start in range(0, resamples, rows)
        ]
    )
    low, high = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return mean, float(low), float(high)


def bootstrap_mean_interval(
    values: Tensor | np.ndarray | Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean over images and its percentile-bootstrap ``level`` interval.

    ``resamples`` resamples of the N values are drawn with replacement (``numpy.random.default_rng(seed)``,
    so the result is deterministic for a seed) and the (1 − level)/2 and 1 − (1 − level)/2 quantiles
    of their means taken: no normality assumption, which matters for the few, skewed per-image scores
    of an evaluation. NaNs (images whose anchor matched the reference, see ``gate_score``) are dropped
    first; with one value left the interval is (v, v), with none it is a ValueError.
    """
    array = _as_float_array(values, "values")
    return _percentile_bootstrap(array[~np.isnan(array)], level, resamples, seed)


def paired_bootstrap_difference(
    a: Tensor | np.ndarray | Sequence[float],
    b: Tensor | np.ndarray | Sequence[float],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high) of ``a − b`` per image, with a paired percentile-bootstrap interval.

    ``a[i]`` and ``b[i]`` must be scores of the same image (e.g. a variant and no technique): image
    indices are resampled, so pairs stay together and the image-to-image spread, which both share,
    cancels out of the interval. Resampling indices of the per-image differences is exactly that.
    Pairs where either value is NaN are dropped.
    """
    a_array, b_array = _as_float_array(a, "a"), _as_float_array(b, "b")
    if len(a_array) != len(b_array):
        raise ValueError(f"a and b must have one value per image each, got {len(a_array)} and {len(b_array)} values")
    difference = a_array - b_array
    return _percentile_bootstrap(difference[~np.isnan(difference)], level, resamples, seed)


def verdict(low: float, high: float) -> str:
    """Reading of an interval of (variant score − no-technique score).

    "helps" when the whole interval is above 0, "hurts" when it is below 0, else "no clear effect":
    an interval that contains 0 does not tell the technique apart from chance.
    """
    if low > 0:
        return "helps"
    if high < 0:
        return "hurts"
    return "no clear effect"
