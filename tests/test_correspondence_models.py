"""The pure-torch parts of correspondence against dense references and hand computations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from csdiff.models import CorrespondenceHead, info_nce, match_points, rescale_points, sample_features


def test_sampled_features_equal_the_bilinearly_resized_map():
    torch.manual_seed(0)
    fmap = torch.randn(5, 6, 7)
    up = F.interpolate(fmap[None], size=(24, 28), mode="bilinear", align_corners=False)[0]
    ys, xs = torch.meshgrid(torch.arange(24), torch.arange(28), indexing="ij")
    pixels = torch.stack([xs.flatten(), ys.flatten()], 1).float()
    got = sample_features(fmap, rescale_points(pixels, (24, 28), (6, 7)))
    torch.testing.assert_close(got, up.flatten(1).t(), atol=1e-5, rtol=1e-5)


def test_rescale_points_round_trips_and_maps_pixel_centres():
    p = torch.tensor([[0.0, 0.0], [99.0, 49.0]])
    q = rescale_points(p, (50, 100), (512, 512))
    torch.testing.assert_close(rescale_points(q, (512, 512), (50, 100)), p)
    torch.testing.assert_close(
        rescale_points(torch.tensor([[-0.5, -0.5]]), (50, 100), (5, 10)), torch.tensor([[-0.5, -0.5]])
    )


def test_chunked_matching_equals_dense_matching():
    torch.manual_seed(1)
    src, trg = torch.randn(16, 8, 8), torch.randn(16, 8, 8)
    size = 32
    points = torch.tensor([[3.0, 4.0], [31.0, 0.0], [17.0, 22.0]])
    dense_src = F.normalize(F.interpolate(src[None], size=(size, size), mode="bilinear", align_corners=False)[0], dim=0)
    dense_trg = F.normalize(F.interpolate(trg[None], size=(size, size), mode="bilinear", align_corners=False)[0], dim=0)
    query = dense_src[:, points[:, 1].long(), points[:, 0].long()].t()
    best = (query @ dense_trg.flatten(1)).argmax(1)
    expected = torch.stack([best % size, best // size], 1).float()
    for chunk in (7, 100, 4096):
        torch.testing.assert_close(match_points(src, trg, points, size, chunk=chunk), expected)


def test_identical_maps_match_every_point_to_itself_and_soft_argmax_stays_near():
    torch.manual_seed(2)
    fmap = torch.randn(32, 16, 16)
    points = torch.tensor([[5.0, 9.0], [12.0, 3.0]])
    torch.testing.assert_close(match_points(fmap, fmap, points, 16), points)
    refined = match_points(fmap, fmap, points, 16, soft_window=2, soft_temperature=0.01)
    assert (refined - points).abs().max() < 0.5


def test_info_nce_by_hand():
    src = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    trg = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    s = F.normalize(src, dim=1) @ F.normalize(trg, dim=1).t() / tau  # [[2, 1.414], [0, 1.414]]
    forward = (
        -(
            math.log(math.exp(s[0, 0]) / (math.exp(s[0, 0]) + math.exp(s[0, 1])))
            + math.log(math.exp(s[1, 1]) / (math.exp(s[1, 0]) + math.exp(s[1, 1])))
        )
        / 2
    )
    backward = (
        -(
            math.log(math.exp(s[0, 0]) / (math.exp(s[0, 0]) + math.exp(s[1, 0])))
            + math.log(math.exp(s[1, 1]) / (math.exp(s[0, 1]) + math.exp(s[1, 1])))
        )
        / 2
    )
    torch.testing.assert_close(info_nce(src, trg, tau), torch.tensor((forward + backward) / 2))


def test_gated_head_weights_sum_to_one_per_channel_and_conv_starts_as_identity():
    torch.manual_seed(3)
    head = CorrespondenceHead(6, num_variants=3, attention_channels=2, head="conv").eval()
    variants = [torch.randn(2, 6, 4, 4) for _ in range(3)]
    attention = torch.rand(2, 2, 4, 4)
    out, gated = head(variants, attention)
    weights = gated.weights[0]  # (V, B, C)
    assert weights.shape == (3, 2, 6)
    torch.testing.assert_close(weights.sum(0), torch.ones(2, 6))
    fused = torch.einsum("vbc,vbchw->bchw", weights, torch.stack(variants))
    torch.testing.assert_close(out, torch.cat([fused, attention], 1), atol=1e-5, rtol=1e-5)


def test_mean_fusion_without_head_has_nothing_to_train():
    head = CorrespondenceHead(4, num_variants=2, head="nn", fusion="mean")
    assert not list(head.parameters())
    a, b = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    out, gated = head([a, b])
    assert gated is None
    torch.testing.assert_close(out, (a + b) / 2)
