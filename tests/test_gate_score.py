"""The GATE content-shift score: contour maps against hand computations, the score's fixed points,
and the bootstrap intervals used to compare techniques. No models: small random tensors only."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from csdiff.assess.gate_score import (
    bootstrap_mean_interval,
    contour_difference,
    gate_score,
    laplacian_norm,
    paired_bootstrap_difference,
    verdict,
)

# Hand-chosen integer channel maps, (1, 2, 4, 4). Their Laplacians at the 2×2 interior pixels are
# channel 0: [[17, -18], [-20, 9]], channel 1: [[-4, 8], [10, -13]] (worked out on paper, and
# asserted below so that the loop implementation is checked too).
HAND = torch.tensor(
    [
        [
            [[1, 2, 0, 3], [4, 0, 5, 1], [2, 6, 1, 0], [3, 1, 2, 4]],
            [[0, 1, 1, 2], [3, 2, 0, 1], [1, 0, 4, 2], [2, 3, 1, 0]],
        ]
    ],
    dtype=torch.float32,
)
OTHER = torch.tensor(
    [
        [
            [[2, 0, 1, 1], [1, 3, 0, 2], [0, 2, 2, 5], [1, 1, 0, 3]],
            [[1, 1, 0, 0], [0, 4, 1, 3], [2, 1, 0, 1], [0, 2, 3, 1]],
        ]
    ],
    dtype=torch.float32,
)


def loop_laplacian(x: list[list[float]]) -> list[list[float]]:
    """x[i-1,j] + x[i+1,j] + x[i,j-1] + x[i,j+1] - 4 x[i,j] at the interior pixels, by plain loops."""
    h, w = len(x), len(x[0])
    return [
        [x[i - 1][j] + x[i + 1][j] + x[i][j - 1] + x[i][j + 1] - 4 * x[i][j] for j in range(1, w - 1)]
        for i in range(1, h - 1)
    ]


def loop_contour_map(image: torch.Tensor) -> list[list[float]]:
    """Contour map of one (C, H, W) image: L2 norm over channels with math.sqrt, by plain loops."""
    laplacians = [loop_laplacian(channel) for channel in image.tolist()]
    rows, cols = len(laplacians[0]), len(laplacians[0][0])
    return [[math.sqrt(sum(lap[i][j] ** 2 for lap in laplacians)) for j in range(cols)] for i in range(rows)]


def numpy_contour_map(x: np.ndarray) -> np.ndarray:
    """Contour maps of (B, C, H, W) in float64: the 3×3 kernel applied offset by offset (valid region)."""
    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
    x = x.astype(np.float64)
    h, w = x.shape[-2:]
    lap = np.zeros(x.shape[:2] + (h - 2, w - 2))
    for di in range(3):
        for dj in range(3):
            lap += kernel[di, dj] * x[:, :, di : di + h - 2, dj : dj + w - 2]
    return np.sqrt((lap**2).sum(axis=1))


def test_loop_laplacian_matches_the_worked_example():
    assert loop_laplacian(HAND[0, 0].tolist()) == [[17, -18], [-20, 9]]
    assert loop_laplacian(HAND[0, 1].tolist()) == [[-4, 8], [10, -13]]


def test_laplacian_norm_equals_hand_computation():
    # Integer inputs: the Laplacian and the sum of squares are exact in float32; only the square root
    # rounds (≤ 1 ulp ≈ 6e-8 relative), so rtol 1e-6 is ample.
    out = laplacian_norm(HAND)
    assert out.shape == (1, 2, 2)
    assert out.dtype == torch.float32
    expected = torch.tensor([loop_contour_map(HAND[0])], dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        out[0].double(),
        torch.tensor([[math.sqrt(305), math.sqrt(388)], [math.sqrt(500), math.sqrt(250)]], dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )


def test_contour_difference_equals_hand_computation():
    # Batch of two: HAND against OTHER, and HAND against its mirror image, whose contour map is the
    # mirrored one: per-pixel differences of both signs that sum to 0 without the absolute value.
    reference = torch.cat([HAND, HAND])
    features = torch.cat([OTHER, HAND.flip(-1)])
    expected = []
    for ref, feat in zip(reference, features):
        ref_map, feat_map = loop_contour_map(ref), loop_contour_map(feat)
        expected.append(
            sum(abs(r - f) for ref_row, feat_row in zip(ref_map, feat_map) for r, f in zip(ref_row, feat_row))
        )
    out = contour_difference(reference, features)
    assert out.shape == (2,)
    # Four float32 square roots and their differences summed: a few ulp of values ~20, rtol 1e-6.
    torch.testing.assert_close(out.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    mirrored = 2 * (math.sqrt(388) - math.sqrt(305)) + 2 * (math.sqrt(500) - math.sqrt(250))
    assert out[1].item() == pytest.approx(mirrored, rel=1e-6)


def test_laplacian_norm_matches_numpy_on_random_data():
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(3, 7, 9, 6, generator=g, dtype=torch.float64)
    y64 = torch.randn(3, 7, 9, 6, generator=g, dtype=torch.float64)
    ref_map, feat_map = numpy_contour_map(x64.numpy()), numpy_contour_map(y64.numpy())
    # float64 input is computed in float64: agreement to float64 rounding.
    out64 = laplacian_norm(x64)
    assert out64.dtype == torch.float64
    np.testing.assert_allclose(out64.numpy(), ref_map, rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        contour_difference(x64, y64).numpy(), np.abs(ref_map - feat_map).sum(axis=(-2, -1)), rtol=1e-12
    )
    # float32 input (the same values rounded to float32, compared against float64 of those values):
    # five-term sums and a 7-term norm of O(1) values, a few float32 ulp (6e-8) each: rtol 1e-5.
    x32, y32 = x64.float(), y64.float()
    ref32, feat32 = numpy_contour_map(x32.numpy()), numpy_contour_map(y32.numpy())
    np.testing.assert_allclose(laplacian_norm(x32).numpy(), ref32, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        contour_difference(x32, y32).numpy(), np.abs(ref32 - feat32).sum(axis=(-2, -1)), rtol=1e-5
    )


def test_constant_and_linear_maps_have_no_contours():
    i = torch.arange(6, dtype=torch.float32).view(6, 1).expand(6, 8)
    j = torch.arange(8, dtype=torch.float32).view(1, 8).expand(6, 8)
    maps = torch.stack([torch.full((6, 8), 5.0), 3 * i - 2 * j + 7, -i, 4 * j])
    out = laplacian_norm(maps[None])
    assert out.shape == (1, 4, 6)
    assert torch.equal(out, torch.zeros(1, 4, 6))
    # A feature map that differs from the reference only by a linear ramp has the same contours.
    reference = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    assert contour_difference(reference, reference + maps[None]).item() == pytest.approx(0, abs=1e-4)


def test_float16_input_is_computed_in_float32():
    # Values ~100: Laplacians ~450, squares ~1e5 overflow float16 (max 65504), so a float16
    # computation would give inf; in float32 the result is that of the same values as float32.
    g = torch.Generator().manual_seed(2)
    x16 = (torch.randn(2, 5, 8, 8, generator=g) * 100).half()
    out = laplacian_norm(x16)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, laplacian_norm(x16.float()), rtol=1e-6, atol=0)
    y16 = (torch.randn(2, 5, 8, 8, generator=g) * 100).half()
    torch.testing.assert_close(
        contour_difference(x16, y16), contour_difference(x16.float(), y16.float()), rtol=1e-6, atol=0
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 40, 16, 16, generator=g), torch.randn(2, 40, 16, 16, generator=g)
    torch.testing.assert_close(laplacian_norm(x.cuda()).cpu(), laplacian_norm(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        contour_difference(x.cuda(), y.cuda()).cpu(), contour_difference(x, y), rtol=1e-5, atol=0
    )


def reference_and_anchor() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    reference = torch.randn(3, 8, 10, 10, generator=g)
    return reference, reference + torch.randn(3, 8, 10, 10, generator=g)


def test_reference_scores_one():
    reference, anchor = reference_and_anchor()
    anchor_diff = contour_difference(reference, anchor)
    assert (anchor_diff > 0).all()
    score = gate_score(contour_difference(reference, reference), anchor_diff)
    assert torch.equal(score, torch.ones(3))


def test_anchor_and_its_copy_score_zero():
    reference, anchor = reference_and_anchor()
    anchor_diff = contour_difference(reference, anchor)
    assert torch.equal(gate_score(anchor_diff, anchor_diff), torch.zeros(3))
    assert torch.equal(gate_score(contour_difference(reference, anchor.clone()), anchor_diff), torch.zeros(3))


def test_less_shift_scores_between_zero_and_one_more_shift_below_zero():
    reference, anchor = reference_and_anchor()
    anchor_diff = contour_difference(reference, anchor)
    closer = gate_score(contour_difference(reference, reference + 0.3 * (anchor - reference)), anchor_diff)
    further = gate_score(contour_difference(reference, reference + 3 * (anchor - reference)), anchor_diff)
    assert ((closer > 0) & (closer < 1)).all()
    assert (further < 0).all()


def test_gate_score_formula():
    score = gate_score(torch.tensor([1.0, 3.0, 0.5]), torch.tensor([2.0, 2.0, 4.0]))
    torch.testing.assert_close(score, torch.tensor([0.5, -0.5, 0.875]))


def test_zero_anchor_diff_gives_nan_not_inf():
    score = gate_score(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 2.0]))
    assert torch.isnan(score[:2]).all()
    assert not torch.isinf(score).any()
    assert score[2].item() == 0.5


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=re.escape("(1, 2, 4, 4)")) as info:
        contour_difference(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))
    assert "(1, 3, 4, 4)" in str(info.value)


@pytest.mark.parametrize("shape", [(2, 4, 4), (1, 2, 3, 4, 4), (1, 2, 2, 5), (1, 2, 5, 2)])
def test_bad_input_shapes_raise(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        laplacian_norm(torch.zeros(shape))


def test_bootstrap_interval_contains_mean_and_mean_is_numpys():
    values = np.random.default_rng(5).normal(1.0, 2.0, size=40)
    mean, low, high = bootstrap_mean_interval(values)
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert low < mean < high


def test_bootstrap_interval_narrows_with_more_images():
    rng = np.random.default_rng(6)
    _, low10, high10 = bootstrap_mean_interval(rng.normal(size=10))
    _, low1000, high1000 = bootstrap_mean_interval(rng.normal(size=1000))
    # Widths ~ 2·1.96/√N: ~1.2 and ~0.12.
    assert high1000 - low1000 < (high10 - low10) / 3


def test_bootstrap_is_deterministic_for_a_seed():
    values = torch.randn(30, generator=torch.Generator().manual_seed(7))
    assert bootstrap_mean_interval(values, seed=3) == bootstrap_mean_interval(values, seed=3)
    assert bootstrap_mean_interval(values, seed=3) != bootstrap_mean_interval(values, seed=4)


def test_bootstrap_accepts_tensor_array_and_list():
    values = [0.25, 1.5, -0.75, 2.0, 0.5]
    expected = bootstrap_mean_interval(values)
    assert bootstrap_mean_interval(np.array(values)) == expected
    assert bootstrap_mean_interval(torch.tensor(values, dtype=torch.float64)) == expected


def test_bootstrap_drops_nan():
    assert bootstrap_mean_interval([1.0, float("nan"), 3.0, 2.5]) == bootstrap_mean_interval([1.0, 3.0, 2.5])
    assert bootstrap_mean_interval(torch.tensor([float("nan"), 2.0])) == (2.0, 2.0, 2.0)


def test_bootstrap_single_value_is_degenerate():
    assert bootstrap_mean_interval([0.7]) == (0.7, 0.7, 0.7)


@pytest.mark.parametrize("values", [[], [float("nan")]])
def test_bootstrap_without_values_raises(values):
    with pytest.raises(ValueError):
        bootstrap_mean_interval(values)


def test_paired_difference_of_a_constant_shift_is_exact():
    a = np.random.default_rng(8).normal(size=50)
    mean, low, high = paired_bootstrap_difference(a, a - 0.5)
    assert mean == pytest.approx(0.5, abs=1e-12)
    assert low == pytest.approx(0.5, abs=1e-12)
    assert high == pytest.approx(0.5, abs=1e-12)


def test_pairing_matters():
    # Images differ a lot from each other, the technique changes each by +0.1 ± 0.05: paired, the
    # spread between images cancels; with the pairs mixed up it does not.
    rng = np.random.default_rng(9)
    base = rng.normal(scale=2.0, size=60)
    a = base + 0.1 + rng.normal(scale=0.05, size=60)
    paired = paired_bootstrap_difference(a, base)
    shuffled = paired_bootstrap_difference(a, rng.permutation(base))
    assert paired != shuffled
    assert paired[2] - paired[1] < (shuffled[2] - shuffled[1]) / 10
    assert verdict(paired[1], paired[2]) == "helps"
    assert verdict(shuffled[1], shuffled[2]) == "no clear effect"


def test_paired_difference_needs_equal_lengths():
    with pytest.raises(ValueError, match="3 and 2"):
        paired_bootstrap_difference([1.0, 2.0, 3.0], [1.0, 2.0])


def test_verdict_words():
    assert verdict(0.1, 0.3) == "helps"
    assert verdict(-0.3, -0.1) == "hurts"
    assert verdict(-0.1, 0.2) == "no clear effect"
