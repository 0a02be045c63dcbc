"""Gate, heads and losses: shapes, identity at init, trainability, hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from csdiff.models import (
    FCNHead,
    GatedFusion,
    ResidualConvBlock,
    SegmentationLoss,
    UPerHead,
    diversity_loss,
    lovasz_softmax,
    residual_stack,
    sparsity_loss,
)

CHANNELS = (8, 16)
SIZES = (8, 4)


def _features(num_variants: int, batch: int = 2, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, c, s, s, generator=g) for c, s in zip(CHANNELS, SIZES)] for _ in range(num_variants)]


# --- residual blocks -------------------------------------------------------------------------


def test_block_is_identity_at_init_and_learns() -> None:
    torch.manual_seed(0)
    block = ResidualConvBlock(4)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(block(x), x)
    block(x).pow(2).sum().backward()
    # The zeroed gamma gets a gradient at once; the convs sit behind it (chain rule through 0)...
    assert block.bn2.weight.grad.abs().sum() > 0
    assert block.conv1.weight.grad.abs().sum() == 0
    # ...and get one as soon as gamma has moved: nothing else is zeroed, so the block learns.
    torch.optim.SGD(block.parameters(), lr=0.1).step()
    block.zero_grad()
    block(x).pow(2).sum().backward()
    for name in ("conv1", "conv2", "bn1", "bn2"):
        assert getattr(block, name).weight.grad.abs().sum() > 0, name


def test_stack_builds_distinct_blocks() -> None:
    stack = residual_stack(4, 3)
    assert len(stack) == 3
    assert len({id(b) for b in stack}) == 3
    assert stack[0].conv1.weight.data_ptr() != stack[1].conv1.weight.data_ptr()


# --- gate ------------------------------------------------------------------------------------


def test_gate_shapes_and_weights_sum_to_one() -> None:
    torch.manual_seed(0)
    gate = GatedFusion(CHANNELS, num_variants=3)
    out = gate(_features(3))
    assert [tuple(f.shape) for f in out.features] == [(2, 8, 8, 8), (2, 16, 4, 4)]
    assert [tuple(w.shape) for w in out.weights] == [(3, 2, 8), (3, 2, 16)]
    for w in out.weights:
        torch.testing.assert_close(w.sum(0), torch.ones_like(w[0]))
    assert out.loss.shape == () and out.loss.item() == 0.0


def test_gate_single_variant_is_identity_at_init() -> None:
    gate = GatedFusion(CHANNELS, num_variants=1, proj_blocks=2, post_blocks=1).eval()
    features = _features(1)
    out = gate(features)
    for w in out.weights:
        assert torch.equal(w, torch.ones_like(w))
    for fused, x in zip(out.features, features[0]):
        assert torch.equal(fused, x)


def test_gate_blocks_receive_gradients() -> None:
    torch.manual_seed(0)
    gate = GatedFusion(CHANNELS, num_variants=2)
    gate(_features(2)).features[0].pow(2).sum().backward()
    block = gate.projections[0][0][0]
    assert block.bn2.weight.grad.abs().sum() > 0
    assert gate.assigners[0][0].fc.weight.grad.abs().sum() > 0


def test_gate_with_three_assigners_and_regulariser() -> None:
    torch.manual_seed(0)
    gate = GatedFusion(CHANNELS, num_variants=2, num_assigners=3, sparsity_weight=0.5, diversity_weight=0.25)
    out = gate(_features(2))
    assert len(gate.assigners[0]) == 3
    assert len({id(m) for level in gate.projections for m in level}) == 2 * len(CHANNELS)
    for w in out.weights:
        torch.testing.assert_close(w.sum(0), torch.ones_like(w[0]))
    assert out.loss.ndim == 0 and out.loss.item() < 0
    out.loss.backward()
    assert all(a.fc.weight.grad is not None for a in gate.assigners[0])


def test_gate_validates_inputs() -> None:
    gate = GatedFusion(CHANNELS, num_variants=2)
    with pytest.raises(ValueError, match="2 variants"):
        gate(_features(3))
    with pytest.raises(ValueError, match="variant 1: gate expects 2 levels"):
        gate([_features(1)[0], _features(1)[0][:1]])
    bad = _features(2)
    bad[1][1] = torch.randn(2, 5, 4, 4)
    with pytest.raises(ValueError, match=r"variant 1, level 1: expected shape \(B, 16, H, W\)"):
        gate(bad)


def test_sparsity_loss_values() -> None:
    one_hot = F.one_hot(torch.tensor([[0, 1, 2], [2, 2, 0]]), 3).permute(2, 0, 1).float()  # (V=3, B=2, C=3)
    uniform = torch.full((3, 2, 3), 1 / 3)
    assert sparsity_loss(one_hot).item() == pytest.approx(-1.0)
    assert sparsity_loss(uniform).item() == pytest.approx(-1 / math.sqrt(3))


def test_diversity_loss_values() -> None:
    uniform = torch.full((4, 2, 3), 0.25)
    always_first = torch.zeros(4, 2, 3)
    always_first[0] = 1
    half_half = torch.zeros(2, 2, 1)  # batch item 0 picks variant 0, item 1 picks variant 1
    half_half[0, 0] = 1
    half_half[1, 1] = 1
    assert diversity_loss(uniform).item() == pytest.approx(-math.log(4))
    assert diversity_loss(always_first).item() == pytest.approx(0.0)
    assert diversity_loss(half_half).item() == pytest.approx(-math.log(2))


# --- heads -----------------------------------------------------------------------------------


def test_uperhead_shape_and_order_check() -> None:
    head = UPerHead([4, 8, 8, 16], num_classes=5, channels=16)
    feats = [torch.randn(2, c, s, s) for c, s in zip([4, 8, 8, 16], [16, 8, 4, 2])]
    assert head(feats).shape == (2, 5, 16, 16)
    reversed_head = UPerHead([16, 8, 8, 4], num_classes=5, channels=16)
    with pytest.raises(ValueError, match="fine to coarse"):
        reversed_head(feats[::-1])


def test_uperhead_batch_one_train_with_1x1_coarsest() -> None:
    head = UPerHead([4, 8], num_classes=3, channels=16).train()
    logits = head([torch.randn(1, 4, 4, 4), torch.randn(1, 8, 1, 1)])
    assert logits.shape == (1, 3, 4, 4)
    logits.sum().backward()


def test_fcn_head_shape() -> None:
    head = FCNHead(8, num_classes=4, channels=16, num_convs=2)
    assert head(torch.randn(2, 8, 6, 6)).shape == (2, 4, 6, 6)


# --- losses ----------------------------------------------------------------------------------


def _two_class_case() -> tuple[torch.Tensor, torch.Tensor]:
    p1 = torch.tensor([0.1, 0.6, 0.8, 0.3])
    probs = torch.stack([1 - p1, p1]).view(1, 2, 1, 4)
    labels = torch.tensor([[[0, 0, 1, 1]]])
    return probs, labels


def test_lovasz_hand_computed() -> None:
    probs, labels = _two_class_case()
    # Errors |fg - p| are (0.1, 0.6, 0.2, 0.7) for both classes, visited as pixels 3, 1, 2, 0.
    # Delta_J(M) = |M| / |fg U M| along that order:
    #   class 1 (fg = {2, 3}): 1/2, 2/3, 3/3, 4/4 -> increments 1/2, 1/6, 1/3, 0
    #   class 0 (fg = {0, 1}): 1/3, 2/3, 3/4, 4/4 -> increments 1/3, 1/3, 1/12, 1/4
    class1 = 0.7 * (1 / 2) + 0.6 * (1 / 6) + 0.2 * (1 / 3) + 0.1 * 0
    class0 = 0.7 * (1 / 3) + 0.6 * (1 / 3) + 0.2 * (1 / 12) + 0.1 * (1 / 4)
    assert lovasz_softmax(probs, labels).item() == pytest.approx((class0 + class1) / 2)


def test_lovasz_perfect_ignore_and_empty() -> None:
    labels = torch.tensor([[[0, 1, 1, 2]]])
    perfect = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    assert lovasz_softmax(perfect, labels).item() == 0.0
    probs, labels = _two_class_case()
    extra = torch.cat([probs, torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)], dim=3)
    extra_labels = torch.cat([labels, torch.tensor([[[255]]])], dim=2)
    assert lovasz_softmax(extra, extra_labels).item() == pytest.approx(lovasz_softmax(probs, labels).item())
    probs.requires_grad_(True)
    empty = lovasz_softmax(probs, torch.full_like(labels, 255))
    assert empty.item() == 0.0 and empty.requires_grad


def test_segmentation_loss_ignores_255_and_upsamples() -> None:
    torch.manual_seed(0)
    loss_fn = SegmentationLoss()
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8))
    base = loss_fn(logits, labels)
    garbage = labels.clone()
    garbage[:, :, 6:] = 255
    changed = loss_fn(logits, garbage)
    assert torch.isfinite(base) and torch.isfinite(changed) and base.item() != changed.item()
    upsampled = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    manual = F.cross_entropy(upsampled, garbage, ignore_index=255) + lovasz_softmax(upsampled.softmax(1), garbage)
    torch.testing.assert_close(changed, manual)
    all_ignored = loss_fn(logits, torch.full_like(labels, 255))
    assert all_ignored.item() == 0.0
    all_ignored.backward()
