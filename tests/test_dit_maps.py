"""Attention maps of diffusion transformers: SD3's and FLUX's joint attention split into its
image→image and image→text parts, and ``cross_maps`` (image-to-text maps of chosen blocks,
averaged) on PixArt, SD3 and FLUX.

The reference for a joint map is the attention recomputed here in float64 from forward hooks on
the stock projections (and, for FLUX, rotary positions applied by hand): it must first reproduce
the stock attention's own output, then its joint softmax, split at the text keys and each part
renormalised, is what the named maps must equal.
"""

from __future__ import annotations

import pytest
import torch
from helpers import load_script, shapes_images

from csdiff.backbone import DiffusionFeatureExtractor, UnknownLayerError, Variant
from csdiff.backbone.capture import ActivationCapture
from csdiff.backbone.families import family_of
from csdiff.backbone.listing import list_layers, prompt_window
from csdiff.backbone.loading import load_sd_components
from csdiff.backbone.names import resolve_layers

PROMPT = "a photo of a red circle and a blue square"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("dit-maps")
    return {
        "pixart": str(load_script("make_tiny_pixart").make_tiny_pixart(work / "tiny-pixart")),
        "sd3": str(load_script("make_tiny_sd3").make_tiny_sd3(work / "tiny-sd3")),
        "flux": str(load_script("make_tiny_flux").make_tiny_flux(work / "tiny-flux")),
    }


@pytest.fixture(scope="module")
def parts(models):
    return {name: load_sd_components(path) for name, path in models.items()}


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's rotary embedding on (B, N, H, D), written out: each (even, odd) pair rotated by its angle."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def _joint_reference(attn, seen: dict, rotary, flux: bool):
    """(attention output of the image stream, image→image map, image→text map), float64."""
    heads = attn.heads
    parts = {}
    for name, norm in (
        ("to_q", attn.norm_q),
        ("to_k", attn.norm_k),
        ("to_v", None),
        ("add_q_proj", attn.norm_added_q),
        ("add_k_proj", attn.norm_added_k),
        ("add_v_proj", None),
    ):
        x = seen[name]
        x = x.view(*x.shape[:2], heads, -1)  # (B, N, H, D)
        x = x if norm is None else norm(x.transpose(1, 2)).transpose(1, 2) if not flux else norm(x)
        parts[name] = x.double()
    n_image = parts["to_q"].shape[1]
    order = ("add", "") if flux else ("", "add")  # FLUX: text first; SD3: image first

    def joint(kind):
        names = {"": f"to_{kind}", "add": f"add_{kind}_proj"}
        return torch.cat([parts[names[o]] for o in order], 1)

    q, k, v = joint("q"), joint("k"), joint("v")
    if flux:
        cos, sin = (r.double() for r in rotary)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, N, D)
    probs = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
    out = (probs @ v).transpose(1, 2).flatten(2)
    image = slice(-n_image, None) if flux else slice(0, n_image)
    text = slice(0, -n_image) if flux else slice(n_image, None)
    rows = probs[:, :, image]
    image_part, text_part = rows[..., image], rows[..., text]
    maps = [(p / p.sum(-1, keepdim=True)).mean(1) for p in (image_part, text_part)]
    return out[:, image], *maps


def _call(family: str, p, latent: torch.Tensor):
    """One stock-call of the denoiser as the extractor calls it (its family's own call)."""
    fam = p.family
    tokenizers = tuple(t for t in (p.tokenizer, p.tokenizer_2, p.tokenizer_3) if t is not None)
    encoders = tuple(e for e in (p.text_encoder, p.text_encoder_2, p.text_encoder_3) if e is not None)
    emb, second = fam.encode(tokenizers, encoders, PROMPT)
    added = fam.added_conditions(second, 64, latent.shape[0], latent.dtype, latent.device)
    t = 500 if fam.noise == "ddpm" else 500.0
    return fam.run(p.unet, latent, t, emb.expand(latent.shape[0], -1, -1), added, {})


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_maps_equal_the_stock_attentions_softmax(parts, family):
    p = parts[family]
    flux = family == "flux"
    torch.manual_seed(0)
    latent = torch.randn(2, 16, 8, 8)
    blocks = (0, 11, 18) if flux else (0, 11, 23)  # SD3's last block keeps no text stream after it
    for i in blocks:
        attn = p.unet.transformer_blocks[i].attn
        seen, handles = {}, []
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            module = getattr(attn, name)
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o)))
        handles.append(attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o)))
        handles.append(
            attn.register_forward_pre_hook(
                lambda m, a, kw: seen.__setitem__("rotary", kw.get("image_rotary_emb")), with_kwargs=True
            )
        )
        try:
            stock = _call(family, p, latent)
            names = [f"vit-block{i}-self-map", f"vit-block{i}-cross-map"]
            with ActivationCapture(p.unet, names, latent_size=(8, 8), prompt_window=prompt_window(p)) as capture:
                with_maps = _call(family, p, latent)
        finally:
            for h in handles:
                h.remove()
        torch.testing.assert_close(with_maps, stock, rtol=0, atol=0)  # the maps change nothing
        out, image_map, text_map = _joint_reference(attn, seen, seen["rotary"], flux)
        # the recomputed attention is the stock one (so are its q and k), up to float32 rounding
        torch.testing.assert_close(attn.to_out[0](out.float()), seen["attn"][0], rtol=1e-4, atol=1e-5)
        n_text = 512 if flux else 77 + 256
        got_self, got_cross = capture.features[names[0]], capture.features[names[1]]
        assert got_self.shape == (2, 16, 4, 4) and got_cross.shape == (2, n_text, 4, 4)
        torch.testing.assert_close(got_self.flatten(2).transpose(1, 2).double(), image_map, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_cross.flatten(2).transpose(1, 2).double(), text_map, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_cross.sum(1), torch.ones(2, 4, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_cross_maps_average_the_familys_blocks(parts, family):
    p = parts[family]
    torch.manual_seed(1)
    latent = torch.randn(1, p.unet.config.in_channels // (4 if family == "flux" else 1), 8, 8)
    chosen = {"pixart": (8, 12, 16, 20), "sd3": (6, 9, 12, 15), "flux": (6, 9, 12, 15)}[family]  # as documented
    blocks = [f"vit-block{i}-cross-map" for i in chosen]
    with ActivationCapture(p.unet, ["cross_maps"], latent_size=(8, 8), prompt_window=prompt_window(p)) as capture:
        _call(family, p, latent)
    with ActivationCapture(p.unet, blocks, latent_size=(8, 8), prompt_window=prompt_window(p)) as separate:
        _call(family, p, latent)
    mean = torch.stack([separate.features[b] for b in blocks]).mean(0)
    torch.testing.assert_close(capture.features["cross_maps"], mean, rtol=0, atol=0)
    rows = {r.name: r for r in list_layers(p, 64)}
    assert list(rows)[-1] == "cross_maps" and rows["cross_maps"].shape == tuple(mean.shape[1:])
    assert rows["cross_maps"].shape[0] == {"pixart": 120, "sd3": 333, "flux": 512}[family]
    # PixArt masks the prompt's padding: those tokens get no attention, the rest sums to 1 per pixel
    torch.testing.assert_close(mean.sum(1), torch.ones(1, 4, 4), rtol=1e-5, atol=1e-5)
    if family == "pixart":
        n_tokens = len(p.tokenizer(PROMPT).input_ids)
        assert mean[:, n_tokens:].abs().max() == 0 and mean[:, :n_tokens].min() > 0


def test_cross_maps_through_the_extractor_and_its_refusals(models, parts):
    images = shapes_images(2, size=64)
    ex = DiffusionFeatureExtractor(
        models["sd3"], ["cross_maps", "vit-block6-out"], img_size=64, variants=[Variant("p", prompt=PROMPT)]
    )
    feats = ex(images)["p"]
    assert feats["cross_maps"].shape == (2, 333, 4, 4) == (2, *ex.feature_shapes()["cross_maps"])
    assert feats["vit-block6-out"].shape == (2, *ex.feature_shapes()["vit-block6-out"])
    torch.testing.assert_close(feats["cross_maps"].float().sum(1), torch.ones(2, 4, 4), rtol=1e-3, atol=1e-3)
    with pytest.raises(UnknownLayerError, match="use `cross_maps`"):
        resolve_layers(parts["pixart"].unet, ["up_cross"])
    sd = load_sd_components("tiny")
    with pytest.raises(UnknownLayerError, match="sd is a UNet: use up_cross"):
        resolve_layers(sd.unet, ["cross_maps"])
    assert family_of(parts["flux"].unet).cross_map_blocks == (6, 9, 12, 15)
    from csdiff.tasks import CorrespondenceTask

    with pytest.raises(UnknownLayerError, match="drop attention_variant and add `cross_maps` to `layers`"):
        CorrespondenceTask(
            backbone={"model": models["sd3"], "img_size": 64}, layers=["vit-block6-out"], attention_variant={}
        )


def test_word_channels_of_t5_and_of_sd3s_two_encoders(parts):
    from csdiff.visualize.attention import dit_word_channels, t5_word_channels

    t5 = parts["pixart"].tokenizer
    pieces = t5.convert_ids_to_tokens(t5(PROMPT, add_special_tokens=False).input_ids)
    assert t5_word_channels(t5, PROMPT, "circle") == [pieces.index("\u2581circle")]
    assert t5_word_channels(t5, PROMPT, "a") == [i for i, p in enumerate(pieces) if p == "\u2581a"]
    with pytest.raises(ValueError, match="the word 'a' is not in the prompt 'zebra'"):
        t5_word_channels(t5, "zebra", "a")  # its last piece 'a' opens no word
    with pytest.raises(ValueError, match="past the 120 tokens"):
        t5_word_channels(t5, " ".join(["photo"] * 130 + ["circle"]), "circle")
    p = parts["sd3"]
    clip, t5_sd3 = p.tokenizer, p.tokenizer_3
    got = dit_word_channels("sd3", (clip, p.tokenizer_2, t5_sd3), PROMPT, "circle")
    clip_pos = clip(PROMPT).input_ids.index(clip("circle", add_special_tokens=False).input_ids[0])
    t5_pos = t5_sd3(PROMPT).input_ids.index(t5_sd3("circle", add_special_tokens=False).input_ids[0])
    assert got == [clip_pos, 77 + t5_pos]
    # past CLIP's 75 tokens SD3 reads the word in T5 only (CLIP is cut, not windowed)
    long = " ".join(["photo"] * 80 + ["circle"])
    assert dit_word_channels("sd3", (clip, p.tokenizer_2, t5_sd3), long, "circle") == [77 + 80]
    with pytest.raises(ValueError, match="past the 256 tokens"):
        dit_word_channels("sd3", (clip, p.tokenizer_2, t5_sd3), " ".join(["photo"] * 300 + ["circle"]), "circle")


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_visualize_draws_words_and_points_on_a_transformer(models, tmp_path, family):
    import cv2
    import numpy as np

    from csdiff.visualize.features import HEADER, PAD, run_visualize

    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "img0.png"), np.random.default_rng(0).integers(0, 255, (48, 56, 3), np.uint8))
    (tmp_path / "cfg.yaml").write_text(
        f"""\
model:
  class_path: csdiff.tasks.SegmentationTask
  init_args:
    num_classes: 4
    backbone: {{model: {models[family]}, img_size: 64, timestep: 50}}
    variants: [{{name: a, prompt: "{PROMPT}"}}]
    layers: [vit-block12-out]
"""
    )
    base = ["--config", str(tmp_path / "cfg.yaml"), "--images", str(tmp_path / "in"), "--cell", "64"]
    args = ["--output", str(tmp_path / "out"), "--words", "[circle, square]", "--points", "[[0.25, 0.75]]"]
    assert run_visualize([*base, *args]) == 0
    pictures = cv2.imread(str(tmp_path / "out" / "img0.attention.png"))
    assert pictures.shape[:2] == (HEADER + 64 + PAD, 4 * (64 + PAD) + PAD)  # input | 2 words | 1 point
