"""LoRA variants against hand-merged weights ``W + scale·alpha/r·up@down`` on a LoRA-free extractor."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import assert_close_up_to_rounding, shapes_images, write_kohya_lora
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from csdiff.backbone import DiffusionFeatureExtractor, Variant
from csdiff.backbone import lora as lora_module
from csdiff.backbone.lora import LoRA, LoRAError, LoRARegistry
from csdiff.backbone.prompts import encode_prompt

PROMPT = "a red circle and a blue square on a striped background"
# several adapters in one UNet is the design, not an accident
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

LAYERS = ["down-level0-repeat0-vit-block0-self-q", "up-level1-upsampler-out"]

# module path -> (rank, alpha): ranks and alphas differ between modules on purpose
UNET_MODULES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4, 2.0),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (2, 8.0),
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2": (4, 1.0),
}
OTHER_MODULES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": (4, 4.0),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": (3, 6.0),
}
TE_MODULES = {  # q_proj alone (no out_proj) and an MLP layer, with different alphas
    "text_model.encoder.layers.0.self_attn.q_proj": (4, 2.0),
    "text_model.encoder.layers.1.mlp.fc1": (4, 8.0),
}


def make(variants, **kw) -> DiffusionFeatureExtractor:
    return DiffusionFeatureExtractor("tiny", LAYERS, img_size=64, variants=variants, **kw)


def submodule(model, path: str):
    """``path`` in ``model``; text-model prefixes are dropped where transformers flattens CLIP."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model.get_submodule(path.removeprefix("text_model."))


def random_lora(model, modules: dict[str, tuple[int, float]], seed: int) -> dict:
    """{path: (down (r,in), up (out,r), alpha)} sized from the model's own layers."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path, (r, alpha) in modules.items():
        n_out, n_in = submodule(model, path).weight.shape[:2]
        out[path] = (torch.randn(r, n_in, generator=gen) * 0.3, torch.randn(n_out, r, generator=gen) * 0.3, alpha)
    return out


def kohya_deltas(lora: dict, scale: float) -> dict[str, torch.Tensor]:
    return {path: scale * alpha / down.shape[0] * up @ down for path, (down, up, alpha) in lora.items()}


def add(*deltas: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for d in deltas:
        for k, v in d.items():
            out[k] = out[k] + v if k in out else v
    return out


@contextmanager
def merged(model, deltas: dict[str, torch.Tensor]):
    """Temporarily replace each module's weight W by W + delta."""
    saved = {}
    with torch.no_grad():
        for path, delta in deltas.items():
            weight = submodule(model, path).weight
            saved[path] = weight.detach().clone()
            weight.add_(delta.reshape(weight.shape))
    try:
        yield
    finally:
        with torch.no_grad():
            for path, w in saved.items():
                submodule(model, path).weight.copy_(w)


def assert_features_equal(got: dict, ref: dict, exact: bool = False) -> None:
    assert list(got) == LAYERS
    for name in LAYERS:
        if exact:
            assert torch.equal(got[name], ref[name]), name
        else:
            assert_close_up_to_rounding(got[name], ref[name], msg=name)  # Wx + BAx vs (W + BA)x


def assert_features_differ(a: dict, b: dict, layers=LAYERS) -> None:
    for name in layers:
        assert (a[name] - b[name]).abs().max() > 1e-3, (
            f"{name}: the LoRA has no visible effect, the test would be vacuous"
        )


# --- shared fixtures ---
@pytest.fixture(scope="module")
def images():
    return shapes_images(1, size=64)


@pytest.fixture(scope="module")
def ref():
    """A LoRA-free extractor whose weights the tests change by hand."""
    return make([Variant("plain", prompt=PROMPT)])


@pytest.fixture(scope="module")
def hand_merged(ref, images):
    """Features of the LoRA-free extractor with W + delta (memoised by key)."""
    cache: dict = {}

    def features(key, unet_deltas=None, te_deltas=None) -> dict:
        if key not in cache:
            ref._prompt_cache.clear()
            with merged(ref.unet, unet_deltas or {}), merged(ref.text_encoder, te_deltas or {}):
                cache[key] = ref(images)["plain"]
            ref._prompt_cache.clear()
        return cache[key]

    return features


@pytest.fixture(scope="module")
def base(hand_merged):
    return hand_merged("base")


# --- kohya and A1111/LDM-named files ---
@pytest.fixture(scope="module")
def kohya(tmp_path_factory, ref):
    folder = tmp_path_factory.mktemp("kohya").resolve()
    main, other = random_lora(ref.unet, UNET_MODULES, seed=1), random_lora(ref.unet, OTHER_MODULES, seed=2)
    return dict(
        lora=main,
        other_lora=other,
        kohya=str(write_kohya_lora(folder / "style.safetensors", main)),
        ldm=str(write_kohya_lora(folder / "style_ldm.safetensors", main, ldm=True)),
        other=str(write_kohya_lora(folder / "other.safetensors", other)),
    )


@pytest.fixture(scope="module")
def kohya_run(kohya, images):
    variants = [
        Variant("kohya-0.5", PROMPT, loras=[LoRA(kohya["kohya"], 0.5)]),
        Variant("kohya-1.0", PROMPT, loras=[LoRA(kohya["kohya"], 1.0)]),
        Variant("kohya-0", PROMPT, loras=[LoRA(kohya["kohya"], 0.0)]),
        Variant("ldm-0.5", PROMPT, loras=[LoRA(kohya["ldm"], 0.5)]),
        Variant("ldm-1.0", PROMPT, loras=[LoRA(kohya["ldm"], 1.0)]),
        Variant("stacked", PROMPT, loras=[LoRA(kohya["kohya"], 0.5), LoRA(kohya["other"], 1.0)]),
        Variant("plain", PROMPT),  # after the LoRA variants: adapters must be switched off
    ]
    ex = make(variants)
    return ex, ex(images)


@pytest.mark.parametrize("fmt", ["kohya", "ldm"])
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_kohya_formats_equal_hand_merged_weights(kohya, kohya_run, hand_merged, base, fmt, scale):
    _, feats = kohya_run
    ref = hand_merged(("kohya", scale), kohya_deltas(kohya["lora"], scale))
    assert_features_differ(feats[f"{fmt}-{scale}"], base)
    assert_features_equal(feats[f"{fmt}-{scale}"], ref)


def test_scale_zero_equals_no_lora(kohya_run, base):
    assert_features_equal(kohya_run[1]["kohya-0"], base, exact=True)


def test_plain_variant_after_lora_variants_is_unaffected(kohya_run, base):
    assert_features_equal(kohya_run[1]["plain"], base, exact=True)


def test_two_loras_in_one_variant_add(kohya, kohya_run, hand_merged):
    deltas = add(kohya_deltas(kohya["lora"], 0.5), kohya_deltas(kohya["other_lora"], 1.0))
    assert_features_equal(kohya_run[1]["stacked"], hand_merged("stacked", deltas))


def test_alpha_folded_per_module(kohya, kohya_run):
    """Each module keeps its own alpha/rank (diffusers alone would give all of them the most common alpha)."""
    ex, _ = kohya_run
    ex.loras.activate([LoRA(kohya["kohya"], 1.0)])
    name = ex.loras.adapters[kohya["kohya"]]
    for path, (down, up, alpha) in kohya["lora"].items():
        layer = ex.unet.get_submodule(path)
        delta = layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight
        torch.testing.assert_close(delta, alpha / down.shape[0] * up @ down, atol=1e-6, rtol=1e-5, msg=path)


# --- diffusers / peft format ---
@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory, tiny_parts):
    unet = copy.deepcopy(tiny_parts.unet)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "ff.net.2"], init_lora_weights=False)
    unet.add_adapter(config)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    folder = tmp_path_factory.mktemp("diffusers_lora").resolve()
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=state, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict()
    )
    (file,) = folder.glob("*.safetensors")
    deltas = {}
    for key, a in state.items():
        if ".lora_A." in key:
            deltas[key.split(".lora_A.")[0]] = state[key.replace(".lora_A.", ".lora_B.")] @ a  # B@A, before alpha/r
    assert len(deltas) > 10  # every to_q, to_v and ff.net.2 of the UNet
    return dict(folder=str(folder), file=str(file), deltas=deltas)


@pytest.fixture(scope="module")
def diffusers_run(diffusers_lora, images):
    ex = make(
        [
            Variant("folder", PROMPT, loras=[LoRA(diffusers_lora["folder"], 1.0)]),
            Variant("file", PROMPT, loras=[LoRA(diffusers_lora["file"], 0.5)]),
        ]
    )
    return ex, ex(images)


def _scaled(deltas: dict, factor: float) -> dict:
    return {k: factor * v for k, v in deltas.items()}


@pytest.mark.parametrize("where, scale", [("folder", 1.0), ("file", 0.5)])
def test_diffusers_format_equals_hand_merged_weights(diffusers_lora, diffusers_run, hand_merged, base, where, scale):
    alpha_over_r = 8 / 4
    got = diffusers_run[1][where]
    ref = hand_merged(("diffusers", scale * alpha_over_r), _scaled(diffusers_lora["deltas"], scale * alpha_over_r))
    assert_features_differ(got, base)
    assert_features_equal(got, ref)


def test_diffusers_alpha_survives_save_and_load(diffusers_lora, diffusers_run, hand_merged):
    ex, feats = diffusers_run
    name = ex.loras.adapters[diffusers_lora["folder"]]
    ex.loras.activate([LoRA(diffusers_lora["folder"], 1.0)])
    layers = [m for m in ex.unet.modules() if isinstance(m, BaseTunerLayer) and name in m.lora_A]
    assert len(layers) == len(diffusers_lora["deltas"])
    for layer in layers:
        assert (layer.r[name], layer.lora_alpha[name], layer.scaling[name]) == (4, 8, 2.0)
    # a dropped alpha (alpha = r) would have given the folder variant at scale 1 the delta B@A
    wrong = hand_merged(("diffusers", 1.0), _scaled(diffusers_lora["deltas"], 1.0))
    assert (feats["folder"][LAYERS[-1]] - wrong[LAYERS[-1]]).abs().max() > 1e-3


def test_folder_and_file_are_separate_adapters(diffusers_lora, diffusers_run):
    ex, _ = diffusers_run
    assert len(ex.loras.adapters) == 2 and ex.loras.in_unet == set(ex.loras.adapters.values())
    assert not ex.loras.in_text_encoder


# --- text-encoder LoRA ---
@pytest.fixture(scope="module")
def te_lora(tmp_path_factory, ref):
    lora = random_lora(ref.text_encoder, TE_MODULES, seed=4)
    path = write_kohya_lora(tmp_path_factory.mktemp("te").resolve() / "te.safetensors", lora, prefix="lora_te")
    return dict(lora=lora, path=str(path))


@pytest.fixture(scope="module")
def te_run(te_lora, images):
    # one UNet call per variant: the plain variant is compared bit for bit with a plain extractor
    ex = make(
        [Variant("te", PROMPT, loras=[LoRA(te_lora["path"], 0.5)]), Variant("plain", PROMPT)], batch_variants=False
    )
    return ex, ex(images)


def test_text_encoder_lora_changes_only_its_variant_prompt(te_lora, te_run, ref, hand_merged, base):
    ex, feats = te_run
    name = ex.loras.adapters[te_lora["path"]]
    assert ex.loras.in_text_encoder == {name} and not ex.loras.in_unet
    assert set(ex._prompt_cache) == {(PROMPT, ()), (PROMPT, ((name, 0.5),))}
    deltas = kohya_deltas(te_lora["lora"], 0.5)
    with merged(ref.text_encoder, deltas):
        expected = encode_prompt(ref.tokenizer, ref.text_encoder, PROMPT)
    plain_emb, te_emb = (
        ex.prompt_embedding(PROMPT, ()),
        ex.prompt_embedding(PROMPT, ((name, 0.5),)),
    )  # both cached above
    torch.testing.assert_close(te_emb, expected, atol=2e-5, rtol=1e-5)
    assert (te_emb - plain_emb).abs().max() > 1e-3
    torch.testing.assert_close(plain_emb, encode_prompt(ref.tokenizer, ref.text_encoder, PROMPT), atol=0, rtol=0)
    assert_features_equal(feats["plain"], base, exact=True)  # run after the TE-LoRA variant
    # the self-attention query layer does not see the prompt; the cross-attended upsampler output does
    assert_features_equal(feats["te"], hand_merged("te", te_deltas=deltas))
    assert_features_differ(feats["te"], base, layers=LAYERS[-1:])


# --- several files, loaded once each ---
def test_each_file_loads_once_as_its_own_adapter(kohya, monkeypatch):
    calls = []
    original = StableDiffusionPipeline.lora_state_dict

    def counting(*args, **kwargs):
        calls.append(kwargs.get("weight_name"))
        return original(*args, **kwargs)

    monkeypatch.setattr(lora_module.StableDiffusionPipeline, "lora_state_dict", counting)
    variants = [
        Variant("a", PROMPT, loras=[LoRA(kohya["kohya"], 1.0)]),
        Variant("b", PROMPT, loras=[LoRA(kohya["kohya"], 0.5), LoRA(kohya["other"], 1.0)]),
        Variant("c", PROMPT, loras=[LoRA(kohya["other"], 0.3)]),
    ]
    ex = make(variants)
    for v in variants:  # switching adapters per variant reloads nothing
        ex.loras.activate(list(v.loras))
    assert sorted(calls) == ["other.safetensors", "style.safetensors"]
    names = set(ex.loras.adapters.values())
    assert len(names) == 2 and set(ex.unet.peft_config) == names


# --- errors ---
def test_missing_file_names_the_path(tiny_parts, tmp_path):
    missing = str(tmp_path / "nowhere" / "style.safetensors")
    with pytest.raises(LoRAError, match="not found") as err:
        LoRARegistry(tiny_parts.unet, {"text_encoder": tiny_parts.text_encoder}).load(missing)
    assert missing in str(err.value)


def test_non_lora_suffix_is_refused(tiny_parts, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a LoRA")
    with pytest.raises(LoRAError, match="not a LoRA file"):
        LoRARegistry(tiny_parts.unet, {"text_encoder": tiny_parts.text_encoder}).load(str(path))


def test_file_matching_no_module_adapts_zero_modules(tmp_path):
    gen = torch.Generator().manual_seed(5)
    lora = {"nonexistent_block": (torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen), 4.0)}
    path = write_kohya_lora(tmp_path / "alien.safetensors", lora)
    with pytest.raises(LoRAError, match="adapts zero modules"):
        make([Variant("a", PROMPT, loras=[LoRA(str(path))])])
