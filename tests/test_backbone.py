"""The extractor against independent references: stock diffusers calls and hand computations."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from helpers import assert_close_up_to_rounding, shapes_images

from csdiff.backbone import (
    LAYER_SETS,
    UP_CROSS,
    ControlNet,
    DiffusionFeatureExtractor,
    LoRA,
    UnknownLayerError,
    Variant,
    enumerate_activations,
    resolve_layers,
)
from csdiff.backbone.capture import ActivationCapture, AttentionMapProcessor
from csdiff.backbone.prompts import encode_prompt, prompt_windows

PROMPT = "a red circle and a blue square on a striped background"


@pytest.fixture(scope="module")
def images():
    return shapes_images(3, size=64)


def make(layers, variants=(Variant("plain", prompt=PROMPT),), **kw) -> DiffusionFeatureExtractor:
    return DiffusionFeatureExtractor("tiny", layers, img_size=kw.pop("img_size", 64), variants=variants, **kw)


def test_sd15_topology_has_197_names(tiny_parts):
    names = enumerate_activations(tiny_parts.unet)
    assert len(names) == 197
    for members in LAYER_SETS.values():
        assert all(m in names for m in members)


def test_named_sets_expand_in_user_order(tiny_parts):
    assert resolve_layers(tiny_parts.unet, ["unet-out", "legacy"]) == ["unet-out", *LAYER_SETS["legacy"]]


def test_unknown_layer_suggests_closest(tiny_parts):
    with pytest.raises(UnknownLayerError, match="did you mean 'up-level1-upsampler-out'"):
        resolve_layers(tiny_parts.unet, ["up-level1-upsampler-outt"])


def _independent_capture(unet, latent, emb, **unet_kwargs):
    """Hooks written independently of csdiff's: every module's output / input, every attention's q, k."""
    seen, handles = {}, []
    for path, module in unet.named_modules():
        handles.append(module.register_forward_hook(lambda m, a, o, p=path: seen.__setitem__(p, o)))
        handles.append(
            module.register_forward_pre_hook(lambda m, a, p=path: seen.__setitem__(p + "<in", a[0]) if a else None)
        )
    unet(latent, 50, encoder_hidden_states=emb, **unet_kwargs)
    for h in handles:
        h.remove()
    return seen


def test_every_name_equals_an_independent_hook(tiny_parts):
    assert_every_name_equals_an_independent_hook(tiny_parts)


def assert_every_name_equals_an_independent_hook(parts, emb: torch.Tensor | None = None, **unet_kwargs) -> None:
    """Every activation name of ``parts.unet`` against hooks written independently of csdiff's
    (``emb`` and ``unet_kwargs``: a family's own text conditioning, for a batch of 2)."""
    unet = parts.unet
    torch.manual_seed(0)
    latent = torch.randn(2, 4, 8, 8)
    if emb is None:
        emb = encode_prompt(parts.tokenizer, parts.text_encoder, PROMPT).expand(2, -1, -1)
    table = enumerate_activations(unet)
    with ActivationCapture(unet, list(table)) as capture:
        unet(latent, 50, encoder_hidden_states=emb, **unet_kwargs)
    seen = _independent_capture(unet, latent, emb, **unet_kwargs)
    for name, act in table.items():
        got = capture.features[name]
        if act.kind == "input":
            ref = seen[act.module + "<in"]
        elif act.kind == "output":
            out = seen[act.module]
            ref = out if torch.is_tensor(out) else out[0]
        elif act.kind == "tokens":
            h, w = seen[act.spatial + "<in"].shape[-2:]
            ref = seen[act.module].permute(0, 2, 1).reshape(2, -1, h, w)
        else:  # attention probabilities from the independently seen q and k
            attn = unet.get_submodule(act.module)
            q, k = seen[act.module + ".to_q"], seen[act.module + ".to_k"]
            heads = attn.heads
            qh = q.view(2, q.shape[1], heads, -1).transpose(1, 2)
            kh = k.view(2, k.shape[1], heads, -1).transpose(1, 2)
            probs = torch.softmax(qh @ kh.transpose(-1, -2) * attn.scale, dim=-1).mean(1)
            h, w = seen[act.module.rsplit(".transformer_blocks", 1)[0] + "<in"].shape[-2:]
            ref = probs.transpose(1, 2).reshape(2, -1, h, w)
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=name)


def test_map_processor_matches_default_attention(tiny_parts):
    unet = tiny_parts.unet
    torch.manual_seed(1)
    latent = torch.randn(1, 4, 8, 8)
    emb = encode_prompt(tiny_parts.tokenizer, tiny_parts.text_encoder, PROMPT)
    ref = unet(latent, 50, encoder_hidden_states=emb).sample
    maps = [n for n, a in enumerate_activations(unet).items() if a.kind.endswith("map")]
    with ActivationCapture(unet, maps):
        assert all(
            isinstance(unet.get_submodule(enumerate_activations(unet)[n].module).processor, AttentionMapProcessor)
            for n in maps
        )
        got = unet(latent, 50, encoder_hidden_states=emb).sample
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # only the requested layers got the processor, and it is removed afterwards
    assert not any(isinstance(p, AttentionMapProcessor) for p in unet.attn_processors.values())


def test_processor_installed_only_where_asked(tiny_parts):
    unet = tiny_parts.unet
    name = "up-level3-repeat0-vit-block0-self-map"
    with ActivationCapture(unet, [name]):
        special = [k for k, p in unet.attn_processors.items() if isinstance(p, AttentionMapProcessor)]
    assert special == ["up_blocks.3.attentions.0.transformer_blocks.0.attn1.processor"]


def test_noised_latent_is_scheduler_add_noise_at_exactly_t(images):
    ex = make(["unet-in"], timestep=50)
    got = ex(images)["plain"]["unet-in"]
    x = torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)
    z = ex.vae.encode(x).latent_dist.mean * ex.vae.config.scaling_factor
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).expand(3, -1, -1, -1)
    ref = ex.scheduler.add_noise(z, noise, torch.tensor([50]))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    ac = ex.scheduler.alphas_cumprod[50]  # by hand, exactly t (not t+1)
    torch.testing.assert_close(got, ac.sqrt() * z + (1 - ac).sqrt() * noise, atol=1e-5, rtol=1e-5)


def test_ddim_step_matches_diffusers_scheduler(images):
    ex = make(["unet-in"])
    ddim = DDIMScheduler.from_config(ex.scheduler.config, set_alpha_to_one=False)
    ddim.set_timesteps(1000)
    torch.manual_seed(2)
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    ref = ddim.step(eps, 60, x, eta=0.0).prev_sample
    torch.testing.assert_close(ex.ddim_step(x, eps, 60), ref, atol=1e-5, rtol=1e-5)


def test_denoise_chain_runs_guided_steps(images):
    calls = []
    ex = make(["up-level1-upsampler-out"], variants=[Variant("chain", PROMPT, denoise_from=60)])
    handle = ex.unet.register_forward_pre_hook(
        lambda m, a, k: calls.append(int(a[1]) if len(a) > 1 else int(k["timestep"])), with_kwargs=True
    )
    ex(images[:1])
    handle.remove()
    assert calls == list(range(60, 50, -1)) + [50]


def test_controlnet_changes_up_blocks_not_down_blocks(images):
    layers = [
        "down-level1-repeat1-res-out",
        "down-level2-downsampler-out",
        "up-level1-upsampler-out",
        "up-level3-repeat2-vit-out",
    ]
    canny = ControlNet("tiny-controlnet-canny")
    ex = make(layers, variants=[Variant("plain", PROMPT), Variant("canny", PROMPT, controlnets=[canny])])
    f = ex(images)
    for name in layers[:2]:  # rows of one batched call; MKL_CBWR=COMPATIBLE's kernels round rows differently
        assert_close_up_to_rounding(f["plain"][name], f["canny"][name], msg=name)
    for name in layers[2:]:
        assert (f["plain"][name] - f["canny"][name]).abs().max() > 1e-4


def test_controlnet_call_shared_only_when_inputs_identical(images):
    canny = ControlNet("tiny-controlnet-canny")
    variants = [
        Variant("a", PROMPT, controlnets=[canny]),
        Variant("b", PROMPT, controlnets=[canny]),
        Variant("c", PROMPT, seed=1, controlnets=[canny]),
    ]
    ex = make(["up-level1-upsampler-out"], variants=variants)
    calls = []
    ex.controlnets["cn0"].register_forward_hook(lambda *a: calls.append(1))
    f = ex(images)
    assert len(calls) == 2  # a and b share, c has other noise
    torch.testing.assert_close(f["a"]["up-level1-upsampler-out"], f["b"]["up-level1-upsampler-out"])


def test_seeds_reproducible_and_distinct(images):
    layer = "up-level2-upsampler-out"
    ex = make(
        [layer], variants=[Variant("s0", PROMPT, seed=0), Variant("s0b", PROMPT, seed=0), Variant("s1", PROMPT, seed=1)]
    )
    a, b = ex(images), ex(images)
    torch.testing.assert_close(a["s0"][layer], b["s0"][layer], atol=0, rtol=0)
    torch.testing.assert_close(a["s0"][layer], a["s0b"][layer], atol=0, rtol=0)
    assert (a["s0"][layer] - a["s1"][layer]).abs().max() > 1e-3


def test_features_do_not_depend_on_batch_mates(images):
    layer = "up-level2-upsampler-out"
    ex = make([layer], latent="sample")
    together = ex(images)["plain"][layer]
    alone = torch.cat([ex(images[i : i + 1])["plain"][layer] for i in range(3)])
    assert_close_up_to_rounding(together, alone)  # batch 3 vs 1: other kernels, another summation order


def test_fresh_noise_differs_per_call(images):
    layer = "up-level2-upsampler-out"
    ex = make([layer], fresh_noise=True)
    assert (ex(images)["plain"][layer] - ex(images)["plain"][layer]).abs().max() > 1e-3


def test_long_prompt_windows(tiny_parts, images):
    long = ", ".join(["a red circle and a blue square on a striped background"] * 12)
    ids = prompt_windows(tiny_parts.tokenizer, long)
    assert ids.shape[0] >= 2 and ids.shape[1] == 77
    assert (ids[:, 0] == tiny_parts.tokenizer.bos_token_id).all()
    assert all(tiny_parts.tokenizer.eos_token_id in row for row in ids.tolist())
    emb = encode_prompt(tiny_parts.tokenizer, tiny_parts.text_encoder, long)
    assert emb.shape[1] == 77 * ids.shape[0]
    name = "up-level1-repeat0-vit-block0-cross-map"
    ex = make([UP_CROSS, name], variants=[Variant("long", long), Variant("short", PROMPT)])
    f = ex(images[:1])
    for variant in ("long", "short"):  # one channel count whatever the prompt length
        assert f[variant][UP_CROSS].shape == (1, 77 * 2, 8, 8)  # tokens × levels at img_size/8
        assert f[variant][name].shape == (1, 77, 2, 2)
        assert {k: tuple(v.shape[1:]) for k, v in f[variant].items()} == ex.feature_shapes()
    # by hand: attention over all 77·n keys, then the mass on each window position summed over windows
    noisy = ex.add_noise(ex.encode_images(images[:1]), ex._noise(ex.variants[0], (4, 8, 8), 1), 50)
    seen = _independent_capture(ex.unet, noisy, emb)
    attn = ex.unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2")
    q, k = seen[attn_path := "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"], seen[attn_path[:-4] + "to_k"]
    qh = q.view(1, q.shape[1], attn.heads, -1).transpose(1, 2)
    kh = k.view(1, k.shape[1], attn.heads, -1).transpose(1, 2)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) * attn.scale, dim=-1).mean(1)  # (1, 4, 77·n)
    folded = probs.view(1, 4, ids.shape[0], 77).sum(2).transpose(1, 2).reshape(1, 77, 2, 2)
    torch.testing.assert_close(f["long"][name], folded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f["long"][name].sum(1), torch.ones(1, 2, 2), atol=1e-5, rtol=0)


def test_attention_map_shapes_and_normalisation(images):
    layers = ["up-level3-repeat0-vit-block0-self-map", "up-level2-repeat1-vit-block0-cross-map", UP_CROSS]
    f = make(layers)(images[:2])["plain"]
    assert f[layers[0]].shape == (2, 64, 8, 8)
    assert f[layers[1]].shape == (2, 77, 4, 4)
    assert f[UP_CROSS].shape == (2, 154, 8, 8)
    torch.testing.assert_close(f[layers[0]].sum(1), torch.ones(2, 8, 8), atol=1e-5, rtol=0)


def test_non_square_input_and_order(images):
    layers = ["up-level3-repeat2-vit-out", "unet-in", "up-level0-upsampler-out"]
    f = make(layers, img_size=128)(torch.rand(2, 3, 50, 90) * 2 - 1)["plain"]
    assert list(f) == layers
    assert f["up-level3-repeat2-vit-out"].shape == (2, 32, 16, 16)


@pytest.mark.parametrize("size", [0, 100, 96])
def test_bad_img_size_is_a_clear_error(size):
    with pytest.raises(ValueError, match="multiple of 64"):
        make(["unet-in"], img_size=size)


def test_frozen_and_always_eval():
    ex = make(["unet-in"])
    assert not any(p.requires_grad for p in ex.parameters())
    wrapper = torch.nn.Sequential(ex)
    wrapper.train()
    assert not ex.training and not ex.unet.training and not ex.vae.training


def test_vae_decoder_not_loaded():
    ex = make(["unet-in"])
    assert ex.vae.decoder is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_close_to_float32(images, dtype):
    layer = "up-level2-upsampler-out"
    ref = make([layer])(images[:1])["plain"][layer]
    low = make([layer], dtype=dtype, feature_dtype="float16")(images[:1])["plain"][layer]
    assert low.dtype == torch.float16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"{dtype} features differ by {rel:.3f}"


@pytest.mark.parametrize(
    "layers,ran,skipped",
    [
        (
            ["up-level0-upsampler-out", "up-level2-upsampler-out", "up-level1-upsampler-out"],
            "up_blocks.2",
            ["up_blocks.3", "conv_out"],
        ),
        (["legacy", UP_CROSS], "up_blocks.3", ["conv_out"]),
        (["down-level1-repeat0-vit-block0-cross-map"], "down_blocks.1", ["mid_block", "up_blocks.0", "conv_out"]),
    ],
)
def test_unet_stops_after_the_last_requested_layer_with_equal_features(images, layers, ran, skipped):
    """The extraction call skips every block after the last requested activation; the features
    equal those of a full UNet call with the same hooks (up to float32 rounding)."""
    variants = [Variant("plain", PROMPT), Variant("canny", PROMPT, controlnets=[ControlNet("tiny-controlnet-canny")])]
    ex = make(layers, variants=variants, batch_variants=False)  # one call per variant, as by hand below
    calls = {path: 0 for path in [ran, *skipped]}
    handles = [
        ex.unet.get_submodule(p).register_forward_pre_hook(lambda *a, p=p: calls.__setitem__(p, calls[p] + 1))
        for p in calls
    ]
    early = ex(images)
    assert all(calls[p] == 0 for p in skipped) and calls[ran] == 2, calls  # never started; once per variant
    for h in handles:
        h.remove()
    ex_full = make(layers, variants=ex.variants)
    full = {}
    latents = ex_full.encode_images(images)
    for variant in ex_full.variants:  # the same call by hand, to the end of the UNet
        emb = ex_full.prompt_embedding(variant.prompt, ()).expand(3, -1, -1)
        noisy = ex_full.add_noise(latents, ex_full._noise(variant, latents.shape[1:], 3), ex_full.timestep)
        conds = ex_full.conditions(variant, ex_full.resize(images), None, {})
        extra = ex_full.control_residuals(variant, noisy, ex_full.timestep, emb, conds, None, None)
        with ActivationCapture(ex_full.unet, ex_full.layers, latent_size=(8, 8)) as capture:
            ex_full.unet(noisy, ex_full.timestep, encoder_hidden_states=emb, **extra)
        full[variant.name] = capture.features
    for v in ("plain", "canny"):
        for name in ex.layers:
            # the same ops in another extractor instance: kernels may still differ by memory alignment
            assert_close_up_to_rounding(early[v][name], full[v][name], msg=name)


def test_batched_variants_equal_one_call_per_variant(images, tmp_path):
    """Variants sharing UNet weights (no UNet LoRA here: prompts, seeds, a ControlNet, a guided
    chain, a text-encoder-free setup) go through one UNet call at t, stacked along the batch; a
    variant with a UNet LoRA and one with a longer prompt get calls of their own. Features equal
    the per-variant path within float tolerance."""
    from helpers import write_kohya_lora

    module = "up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)
    write_kohya_lora(
        tmp_path / "lora.safetensors",
        {module: (torch.randn(4, 64, generator=g) * 0.3, torch.randn(64, 4, generator=g) * 0.3, 4.0)},
    )
    canny = ControlNet("tiny-controlnet-canny")
    long = ", ".join(["a red circle and a blue square on a striped background"] * 12)
    variants = [
        Variant("plain", PROMPT),
        Variant("seed1", "a photo", seed=1),
        Variant("canny", PROMPT, controlnets=[canny]),
        Variant("chain", PROMPT, denoise_from=53, controlnets=[canny]),
        Variant("lora", PROMPT, loras=[LoRA(str(tmp_path / "lora.safetensors"))]),
        Variant("long", long),
    ]
    layers = ["up-level1-upsampler-out", "up-level2-repeat1-vit-block0-cross-map", UP_CROSS]
    at_t = []
    batched = make(layers, variants=variants)
    handle = batched.unet.register_forward_pre_hook(
        lambda m, a, k: at_t.append(a[0].shape[0]) if int(a[1] if len(a) > 1 else k["timestep"]) == 50 else None,
        with_kwargs=True,
    )
    together = batched(images)
    handle.remove()
    assert sorted(at_t) == [3, 3, 12]  # (plain, seed1, canny, chain) × 3 images; lora; long
    alone = make(layers, variants=variants, batch_variants=False)(images)
    for v in variants:
        for name in layers:
            assert_close_up_to_rounding(together[v.name][name], alone[v.name][name], msg=f"{v.name} {name}")


def test_prompt_fields_fill_each_images_prompt_grouped_by_category_and_cached(images):
    """DIFT prompts each image with its category (Tsingularity/dift src/models/dift_sd.py L253:
    f"a photo of a {cat}", one embedding per category, picked per image at L280-284). A template
    variant gives each image the features of a fixed-prompt variant with its category's prompt;
    the batch runs once per category; each prompt is encoded once; variants without fields run
    exactly as without prompt_fields, bit for bit."""
    layer = "up-level1-upsampler-out"
    cats = ["cat", "dog", "cat"]
    fixed = [Variant("plain", PROMPT), Variant("cat", "a photo of a cat"), Variant("dog", "a photo of a dog")]
    ex = make([layer], variants=[Variant("dift", "a photo of a {category}"), *fixed])
    unet_batches, encodes = [], []
    ex.unet.register_forward_pre_hook(lambda m, a: unet_batches.append(a[0].shape[0]))
    ex.text_encoder.register_forward_pre_hook(lambda m, a: encodes.append(1))
    f = ex(images, prompt_fields=[{"category": c} for c in cats])
    assert sorted(unet_batches) == [1, 2, 9]  # dog alone, the two cats, the fixed variants × 3 images
    assert len(encodes) == 3  # PROMPT, "a photo of a cat", "a photo of a dog": the filled prompts are cached
    for i, c in enumerate(cats):
        assert_close_up_to_rounding(f["dift"][layer][i], f[c][layer][i], msg=c)
    ex(images, prompt_fields=[{"category": c} for c in cats])
    assert len(encodes) == 3
    alone = ex(images, variants=[v.name for v in fixed])
    assert all(torch.equal(alone[v.name][layer], f[v.name][layer]) for v in fixed)
    with pytest.raises(ValueError, match=r"have prompt fields \['category'\]: pass prompt_fields"):
        ex(images)
    with pytest.raises(ValueError, match=r"needs \['category'\] per image, got \['colour'\]"):
        ex(images, prompt_fields=[{"colour": "red"}] * 3)


def test_variant_sample_is_each_variants_own_seeded_posterior_sample(images):
    """``variant_sample``: each variant (ensemble member) starts from its own posterior sample,
    seeded by (vae_seed, its seed) and broadcast over the batch; ``sample`` shares one."""
    layer = "unet-in"  # with noise off: the scaled latent itself
    variants = [Variant("a", PROMPT, seed=0), Variant("a2", PROMPT, seed=0), Variant("b", PROMPT, seed=1)]
    shared = make([layer], variants=variants, latent="sample", noise=False)(images)
    assert torch.equal(shared["a"][layer], shared["b"][layer])
    ex = make([layer], variants=variants, latent="variant_sample", noise=False)
    f = ex(images)
    assert torch.equal(f["a"][layer], f["a2"][layer]) and (f["a"][layer] - f["b"][layer]).abs().max() > 1e-2
    assert_close_up_to_rounding(ex(images[1:2])["b"][layer], f["b"][layer][1:2])  # no batch mate changes it
    with torch.no_grad():
        posterior = ex.vae.encode(images).latent_dist
    eps = (f["b"][layer] / ex.vae.config.scaling_factor - posterior.mean) / posterior.std
    torch.testing.assert_close(eps, eps[:1].expand_as(eps), atol=1e-2, rtol=0)  # one map for every image (up to / std)
    assert (
        0.8 < eps.std().item() < 1.2
        and (eps - (shared["a"][layer] / ex.vae.config.scaling_factor - posterior.mean) / posterior.std).abs().max()
        > 0.1
    )


def test_difts_ensemble_has_a_fresh_posterior_sample_and_noise_per_member_and_image(images):
    """DIFT's ensemble, re-implemented from Tsingularity/dift src/models/dift_sd.py: the image is
    repeated ensemble_size times as one batch (L227), each copy encodes its own posterior sample
    (L178 latent_dist.sample()) and gets its own noise (L180 randn_like), noised with add_noise
    at t (L181); the up-block output is the feature (L155-156), averaged over members (L243).
    csdiff's members are variants with ``latent: variant_sample`` and ``fresh_noise``; the
    reference draws the same numbers in csdiff's order (per member: posterior draw, then noise,
    each (B, 4, h, w)), so the features must agree."""
    from csdiff.models import CorrespondenceHead

    layer, t = "up-level1-upsampler-out", 261
    members = [Variant(f"m{k}", PROMPT) for k in range(4)]
    ex = make([layer], variants=members, latent="variant_sample", fresh_noise=True, timestep=t)
    torch.manual_seed(0)
    got = ex(images)
    torch.manual_seed(0)
    reference = []
    handle = ex.unet.up_blocks[1].register_forward_hook(lambda m, a, o: reference.append(o))
    with torch.no_grad():
        posterior = ex.vae.encode(images).latent_dist
        emb = ex.prompt_embedding(PROMPT, ()).expand(len(images), -1, -1)
        for _ in members:
            z = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape)) * ex.vae.config.scaling_factor
            noisy = ex.scheduler.add_noise(z, torch.randn(z.shape), torch.full((len(images),), t))
            ex.unet(noisy, t, encoder_hidden_states=emb)
    handle.remove()
    for member, expected in zip(members, reference):
        assert_close_up_to_rounding(got[member.name][layer], expected, msg=member.name)
    ensemble, _ = CorrespondenceHead(expected.shape[1], len(members), head="nn", fusion="mean")(
        [got[m.name][layer] for m in members]
    )
    assert_close_up_to_rounding(ensemble, torch.stack(reference).mean(0))  # DIFT's mean over members
    twice = ex(images[:1].expand(2, -1, -1, -1))["m0"][layer]
    assert (twice[0] - twice[1]).abs().max() > 1e-3  # fresh per image: two copies differ, as DIFT's members do
