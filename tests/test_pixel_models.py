"""Label-scarce pixel models: the native-size feature bank against F.interpolate, gate, MLP,
ensemble vote, early stopping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from csdiff.data.pixels import PixelFeatureBank
from csdiff.data.reading import DataError
from csdiff.models.pixel import (
    EarlyStopper,
    PixelEnsemble,
    PixelMember,
    PixelMLP,
    PixelVariantGate,
    VariantChannelGate,
    gate_sparsity_loss,
)

OUT = 32
LAYERS = {"l4": (3, 4), "l8": (2, 8), "l16": (5, 16)}  # name: (channels, native size)


def _features(num_images: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per image: variants a, b (gated) with the three layers, and one extra source e."""
    gen = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(num_images):
        maps = {f"{v}/{name}": torch.rand(c, s, s, generator=gen) for v in "ab" for name, (c, s) in LAYERS.items()}
        maps["e/x8"] = torch.rand(4, 8, 8, generator=gen)
        maps["unused/l4"] = torch.rand(1, 4, 4, generator=gen)
        images.append(maps)
    return images


def _reference(images: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, OUT, OUT, V, C) and (N, OUT, OUT, E) by upsampling every map to OUT² with F.interpolate."""

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[None].float(), size=(OUT, OUT), mode="bilinear", align_corners=False)[0]

    gated = torch.stack(
        [torch.stack([torch.cat([up(m[f"{v}/{n}"]) for n in LAYERS]) for v in "ab"]) for m in images]
    )  # (N, V, C, H, W)
    extra = torch.stack([up(m["e/x8"]) for m in images])
    return gated.permute(0, 3, 4, 1, 2), extra.permute(0, 2, 3, 1)


def _all_pixels(num_images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image, y, x = torch.meshgrid(torch.arange(num_images), torch.arange(OUT), torch.arange(OUT), indexing="ij")
    return image.flatten(), y.flatten(), x.flatten()


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float16, 1e-3), (torch.float32, None)])
def test_gather_equals_interpolate(dtype, atol):
    images = _features()
    bank = PixelFeatureBank(images, variants=["a", "b"], extra=["e"], out_size=OUT, dtype=dtype)
    assert (bank.channels, bank.extra_channels, bank.layers) == (10, 4, list(LAYERS))
    gated, extra = bank.gather(*_all_pixels(2))
    want_gated, want_extra = _reference(images)
    assert gated.dtype == torch.float32 and gated.shape == (2 * OUT * OUT, 2, 10) and extra.shape == (2 * OUT * OUT, 4)
    if atol is None:  # float32 storage: PyTorch's own arithmetic, up to rounding
        torch.testing.assert_close(gated, want_gated.reshape(-1, 2, 10))
        torch.testing.assert_close(extra, want_extra.reshape(-1, 4))
    else:
        torch.testing.assert_close(gated, want_gated.reshape(-1, 2, 10), atol=atol, rtol=0)
        torch.testing.assert_close(extra, want_extra.reshape(-1, 4), atol=atol, rtol=0)
    expected_bytes = 2 * dtype.itemsize * (2 * sum(c * s * s for c, s in LAYERS.values()) + 4 * 8 * 8)
    assert bank.nbytes == expected_bytes  # native sizes only; the "unused" source is not read


def test_gather_any_pixel_order_and_bounds():
    images = _features()
    bank = PixelFeatureBank(images, variants=["a", "b"], out_size=OUT, dtype=torch.float32)
    image, y, x = torch.tensor([1, 0, 1]), torch.tensor([31, 0, 7]), torch.tensor([0, 31, 19])
    gated, extra = bank.gather(image, y, x)
    want = _reference(images)[0][image, y, x]
    assert extra is None
    torch.testing.assert_close(gated, want)
    with pytest.raises(IndexError, match=r"y indices must lie in \[0, 32\)"):
        bank.gather(image, y + 1, x)
    with pytest.raises(IndexError, match=r"image indices must lie in \[0, 2\)"):
        bank.gather(image + 1, y, x)


def test_gather_image_covers_every_pixel_once():
    bank = PixelFeatureBank(_features(), variants=["a", "b"], extra=["e"], out_size=OUT)
    chunks = list(bank.gather_image(1, chunk=100))
    flat = torch.cat([c[0] for c in chunks])
    assert len(chunks) == 11 and torch.equal(flat, torch.arange(OUT * OUT))
    gated, extra = bank.gather(*(t[OUT * OUT :] for t in _all_pixels(2)))
    assert torch.equal(torch.cat([c[1] for c in chunks]), gated)
    assert torch.equal(torch.cat([c[2] for c in chunks]), extra)


def test_from_safetensors(tmp_path):
    images = _features()
    paths = []
    for i, maps in enumerate(images):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({k: v.half() for k, v in maps.items()}, str(paths[-1]))
    layers = list(LAYERS)
    from_files = PixelFeatureBank.from_safetensors(paths, ["a", "b"], extra=["e"], out_size=OUT, layers=layers)
    in_memory = PixelFeatureBank(images, ["a", "b"], extra=["e"], out_size=OUT)
    pixels = _all_pixels(2)
    assert all(torch.equal(p, q) for p, q in zip(from_files.gather(*pixels), in_memory.gather(*pixels)))
    # without `layers`, the file's key order (sorted by name) is the channel order
    assert PixelFeatureBank.from_safetensors(paths, ["a"]).layers == ["l16", "l4", "l8"]
    paths[1].write_bytes(b"broken")
    with pytest.raises(DataError, match=r"cannot read features file .*1\.safetensors"):
        PixelFeatureBank.from_safetensors(paths, ["a", "b"])


def test_wrong_variant_layouts_are_refused():
    images = _features()
    del images[0]["b/l8"]
    with pytest.raises(DataError, match=r"image 0: variant 'b' has layers .* first differing at 'b/l16'"):
        PixelFeatureBank(images, ["a", "b"])
    images = _features()
    images[0] = {k: images[0][k] for k in ["a/l4", "a/l8", "b/l8", "b/l4"]}
    with pytest.raises(DataError, match=r"first differing at 'b/l8'"):
        PixelFeatureBank(images, ["a", "b"])
    images = _features()
    images[0]["b/l8"] = torch.rand(7, 8, 8)
    with pytest.raises(DataError, match=r"'b/l8' has 7 channels but 'a/l8' has 2"):
        PixelFeatureBank(images, ["a", "b"])
    images = _features()
    images[1]["a/l16"] = torch.rand(5, 8, 8)
    with pytest.raises(
        DataError, match=r"image 1: feature 'a/l16' has shape \(5, 8, 8\) but image 0's is \(5, 16, 16\)"
    ):
        PixelFeatureBank(images, ["a", "b"])
    images = _features()
    del images[1]["e/x8"]
    with pytest.raises(DataError, match=r"image 1 has no feature 'e/x8'"):
        PixelFeatureBank(images, ["a", "b"], extra=["e"])
    with pytest.raises(DataError, match=r"image 0 has no features of 'c'"):
        PixelFeatureBank(_features(), ["c"])


def test_gate_starts_at_the_mean():
    gate = VariantChannelGate(3, 5)
    features = torch.randn(7, 3, 5)
    torch.testing.assert_close(gate(features), features.mean(dim=1))
    with torch.no_grad():
        gate.logits[1] = 50.0  # one variant dominates every channel
    torch.testing.assert_close(gate(features), features[:, 1])
    with pytest.raises(ValueError, match="gate expects features shaped"):
        gate(torch.randn(7, 2, 5))


def _paper_gate(assigner: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's label-scarce gate with one assigner, re-implemented from diffusion-content-shift
    scarce_segmentation_gate/segmentation/pixel_classifier.py, ``pixel_classifier.forward``:
    the assigner maps each variant's features x[:, b, :] to one logit per channel, softmax over
    the variants (dim 0 of the stack), weighted sum over them. Returns (fused, weights (P, V, C))."""
    weights = torch.stack([assigner(x[:, b, :]) for b in range(x.shape[1])])
    weights = F.softmax(weights, dim=0).permute(1, 0, 2)
    return torch.sum(weights * x, dim=1), weights


def _paper_assigner(channels: int) -> torch.nn.Sequential:
    """pixel_classifier.__init__'s ``weight_assigner`` entry (``nn.Dropout()``: p = 0.5)."""
    return torch.nn.Sequential(
        torch.nn.Linear(channels, 128),
        torch.nn.ReLU(),
        torch.nn.BatchNorm1d(128),
        torch.nn.Dropout(),
        torch.nn.Linear(128, channels),
    )


def test_per_pixel_gate_follows_the_paper():
    gate = PixelVariantGate(num_variants=3, channels=40)
    kinds = [(type(m).__name__, getattr(m, "out_features", getattr(m, "p", None))) for m in gate.assigner]
    assert kinds == [("Linear", 128), ("ReLU", None), ("BatchNorm1d", None), ("Dropout", 0.5), ("Linear", 40)]
    big = PixelVariantGate(2, 2000)  # the paper's init_weights: Linear ~ N(0, 0.02), bias 0
    assert abs(big.assigner[0].weight.std().item() - 0.02) < 1e-3 and not big.assigner[4].bias.any()
    with torch.no_grad():  # away from init, so that the weights differ clearly between pixels
        for m in gate.assigner:
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.3)
    reference = _paper_assigner(40)
    reference.load_state_dict(gate.assigner.state_dict())
    x = torch.randn(64, 3, 40)
    for train in (True, False):  # training: per-variant BatchNorm statistics and dropout; then eval
        gate.train(train), reference.train(train)
        torch.manual_seed(1)
        fused, weights = gate.fuse(x)
        torch.manual_seed(1)
        want_fused, want_weights = _paper_gate(reference, x)
        torch.testing.assert_close(fused, want_fused)
        torch.testing.assert_close(weights, want_weights)
    assert torch.equal(gate.assigner[2].running_mean, reference[2].running_mean)  # the same 3 BatchNorm updates
    assert weights.shape == (64, 3, 40) and torch.allclose(weights.sum(1), torch.ones(64, 40))
    assert (weights[0] - weights[1]).abs().max() > 0.05  # each pixel its own weights
    with pytest.raises(ValueError, match="gate expects features shaped"):
        gate(torch.randn(7, 2, 40))


def test_sparsity_term_follows_the_paper():
    """task-pixel.py ``train``: ``loss + sparsity * sparsity_loss * loss.detach() / (-sparsity_loss.detach())``
    with ``sparsity_loss = -torch.linalg.norm(weights, dim=1).mean()`` (pixel_classifier.forward,
    one assigner and no other gate): same value and gradients."""
    member = PixelMember(num_variants=3, channels=12, extra_channels=0, num_classes=5)
    x, y = torch.randn(32, 3, 12), torch.randint(0, 5, (32,))
    torch.manual_seed(0)
    logits, weights = member.forward_with_weights(x)
    ce = F.cross_entropy(logits, y)
    ours = ce + 0.3 * gate_sparsity_loss(weights, ce)
    params = list(member.gate.parameters())
    got = torch.autograd.grad(ours, params, retain_graph=True)
    penalty = -torch.linalg.norm(weights, dim=1).mean()
    paper = ce + 0.3 * penalty * ce.detach() / (-penalty.detach())
    want = torch.autograd.grad(paper, params)
    assert ours.item() == pytest.approx(paper.item()) == pytest.approx(0.7 * ce.item())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    uniform = torch.full((4, 3, 12), 1 / 3)  # -||w|| is -1/sqrt(V) when uniform, -1 when one-hot
    assert gate_sparsity_loss(uniform, torch.tensor(2.0)).item() == pytest.approx(-2.0)


def test_majority_vote_breaks_ties_to_the_smallest_class():
    votes = torch.tensor(
        [
            [2, 3, 1, 3],
            [2, 1, 1, 2],
            [1, 3, 1, 1],
            [0, 1, 2, 0],
        ]
    )  # (M=4 members, P=4 pixels), one column per pixel: 2 wins 2:1:1; 1 and 3 tie → 1; 1 wins 3:1; 4-way tie → 0
    logits = F.one_hot(votes, 4).float() * 5 + torch.randn(4, 4, 4) * 0.1
    assert PixelEnsemble.majority_vote(logits).tolist() == [2, 1, 1, 0]


def test_pixel_mlp_follows_upstream():
    mlp = PixelMLP(40, 21)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear"]
    assert [m.out_features for m in mlp if isinstance(m, torch.nn.Linear)] == [128, 32, 21]
    assert mlp(torch.randn(6, 40)).shape == (6, 21)
    wide = PixelMLP(40, 34)  # 30 classes or more: upstream's wider variant
    assert [m.out_features for m in wide if isinstance(m, torch.nn.Linear)] == [256, 128, 34]
    assert [m.out_features for m in PixelMLP(40, 29) if isinstance(m, torch.nn.Linear)] == [128, 32, 29]
    big = PixelMLP(2000, 21)
    assert abs(big[0].weight.std().item() - 0.02) < 1e-3 and not big[0].bias.any()
    assert torch.equal(big[2].weight, torch.ones(128)) and not big[2].bias.any()


def test_ensemble_shapes():
    ensemble = PixelEnsemble(num_members=3, num_variants=2, channels=10, extra_channels=4, num_classes=21)
    logits = ensemble(torch.randn(8, 2, 10), torch.randn(8, 4))
    assert logits.shape == (3, 8, 21) and PixelEnsemble.majority_vote(logits).shape == (8,)
    assert not torch.equal(logits[0], logits[1])  # members are initialised independently
    with pytest.raises(ValueError, match=r"extra features shaped \(8, 4\), got None"):
        ensemble(torch.randn(8, 2, 10))
    plain = PixelEnsemble(num_members=2, num_variants=1, channels=10, extra_channels=0, num_classes=29)
    assert plain(torch.randn(8, 1, 10)).shape == (2, 8, 29)
    with pytest.raises(ValueError, match="built without extra channels"):
        plain(torch.randn(8, 1, 10), torch.randn(8, 4))


def test_early_stopper():
    stopper = EarlyStopper(patience=2)
    assert not any(stopper.step(epoch, 9.0) for epoch in range(4))  # epochs 0..3 are not checked
    assert stopper.best == float("inf")
    results = [stopper.step(4, loss) for loss in (1.0, 0.9, 0.95, 0.9, 0.8, 0.85, 0.85)]
    # 1.0 best, 0.9 best, 0.95 bad 1, 0.9 (not strictly better) bad 2, 0.8 best, bad 1, bad 2
    assert results == [False] * 7 and stopper.best == 0.8
    assert stopper.step(5, 0.81) and stopper.stopped and stopper.step(5, 0.1)  # bad 3 > patience: stop, and stay
    upstream = EarlyStopper()
    assert (upstream.after_epoch, upstream.patience, upstream.max_epochs) == (3, 50, 100)
    upstream.step(4, 1.0)
    assert [upstream.step(4, 1.0) for _ in range(51)] == [False] * 50 + [True]


def test_native_size_logits_equal_per_pixel_logits():
    """The test-time path (gate and first Linear at native size, then upsampling 128 channels)
    gives the logits of gathering every pixel's upsampled features (float tolerance)."""
    from csdiff.data.pixels import PixelFeatureBank
    from csdiff.models.pixel import PixelEnsemble

    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4, 4), "b": (5, 8, 8), "c": (2, 16, 16)}
    image = {f"{v}/{k}": torch.randn(*s, generator=g) for v in ("v0", "v1") for k, s in shapes.items()}
    image["ddpm/x"] = torch.randn(4, 32, 32, generator=g)
    bank = PixelFeatureBank(
        [image], ["v0", "v1"], extra=["ddpm"], out_size=32, layers=list(shapes), dtype=torch.float32
    )
    ensemble = PixelEnsemble(2, 2, bank.channels, bank.extra_channels, 5, gate="per_channel").eval()
    for member in ensemble.members:
        member.gate.logits.data.normal_(generator=g)
        for bn in (m for m in member.mlp if isinstance(m, torch.nn.BatchNorm1d)):
            bn.running_mean.normal_(generator=g)
    per_pixel = torch.cat([ensemble(f, e) for _, f, e in bank.gather_image(0, chunk=300)], dim=1)
    maps, extra = bank.native_maps(0)
    torch.testing.assert_close(ensemble.forward_native(maps, extra, 32), per_pixel, rtol=1e-4, atol=1e-5)
