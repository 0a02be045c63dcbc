"""kohya LoCon files (LoRA on every Linear and Conv2d of the attention and ResNet blocks and the
samplers, 3×3 convolutions included, and on the text encoder) against float64 hand merges
``W + s·(α/r)·up∘down``, at tiny and at SD 1.5 widths; LyCORIS kinds and keys csdiff does not
apply are refused whole, in one line that names them.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_close_up_to_rounding,
    assert_refused_in_one_line,
    locon_targets,
    merge_lora_by_hand,
    random_locon,
    shapes_images,
)
from ldm_format import _convert, unet_prefix_map
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from csdiff.backbone import DiffusionFeatureExtractor, LoRA, Variant
from csdiff.backbone import lora as lora_module
from csdiff.backbone.loading import load_sd_components
from csdiff.backbone.lora import LoRARegistry
from csdiff.backbone.lora_files import kohya_delta, kohya_tensors, save_kohya_lora
from csdiff.backbone.random_models import random_unet

PROMPT = "a red circle and a blue square on a striped background"
# after 3×3 convs and time embeddings / after the upsampler / the UNet's output (downstream of all)
LAYERS = ["down-level0-repeat1-res-out", "up-level1-upsampler-out", "unet-out"]
SCALE = 0.7
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


@pytest.fixture(scope="module")
def images():
    return shapes_images(1, size=64)


def adapted(model: torch.nn.Module, adapter: str) -> dict[str, BaseTunerLayer]:
    """The peft layers that hold ``adapter``, by the path of the layer they wrap."""
    return {p: m for p, m in model.named_modules() if isinstance(m, BaseTunerLayer) and adapter in m.lora_A}


def hand_merged_features(ex: DiffusionFeatureExtractor, modules: dict, scale: float, images) -> dict:
    """The ``plain`` variant's features once ``modules`` are merged into ``ex``'s own weights by hand
    (float64, rounded once to float32; through peft's wrappers, the base weights)."""
    merge_lora_by_hand({"unet": ex.unet, "text_encoder": ex.text_encoder}, modules, scale)
    ex._prompt_cache.clear()  # the prompt embedding depends on the text encoder's weights
    return ex(images)["plain"]


def assert_equal_to_hand_merge(got: dict, want: dict, base: dict, rel: float) -> None:
    for name in want:
        assert_close_up_to_rounding(got[name], want[name], rel=rel, msg=name)
        change = (want[name] - base[name]).abs().max() / base[name].abs().max()
        assert change > 1e-3, f"{name}: the LoCon has no visible effect, the test would be vacuous"


# --- tiny: a full LoCon on every target ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_locon(tmp_path_factory, tiny_parts):
    modules = random_locon(tiny_parts.unet, tiny_parts.text_encoder, rank=4, alpha=2.0, seed=11)
    path = save_kohya_lora(tmp_path_factory.mktemp("locon") / "locon.safetensors", modules)
    return modules, path


@pytest.fixture(scope="module")
def tiny_run(tiny_locon, images):
    """A LoCon variant, and a LoRA-free extractor before and after merging the LoCon by hand."""
    modules, path = tiny_locon
    ex = DiffusionFeatureExtractor(
        "tiny", LAYERS, img_size=64, variants=[Variant("locon", PROMPT, loras=[LoRA(str(path), SCALE)])]
    )
    got = ex(images)["locon"]
    ref = DiffusionFeatureExtractor("tiny", LAYERS, img_size=64, variants=[Variant("plain", PROMPT)])
    base = ref(images)["plain"]
    return ex, got, base, hand_merged_features(ref, modules, SCALE, images)


def test_every_locon_target_is_adapted_with_its_exact_update(tiny_parts, tiny_locon, tiny_run):
    modules, path = tiny_locon
    ex = tiny_run[0]
    name = ex.loras.load(str(path))
    ex.loras.activate([LoRA(str(path), 1.0)])  # peft's scaling holds the variant's scale: compare at 1
    targets = locon_targets(tiny_parts.unet, tiny_parts.text_encoder)  # a model without peft's wrappers
    assert {k: len(v) for k, v in targets.items()} == {"unet": 277, "text_encoder": 12}
    assert {tuple(tiny_parts.unet.get_submodule(p).weight.shape[2:]) for p in targets["unet"]} == {(), (1, 1), (3, 3)}
    for component, model in (("unet", ex.unet), ("text_encoder", ex.text_encoder)):
        layers = adapted(model, name)
        assert set(layers) == set(targets[component]), component  # none skipped, none extra
        for p, layer in layers.items():
            down, up, alpha = modules[component][p]
            want = kohya_delta(down, up, alpha, layer.get_base_layer().weight.shape)
            got = layer.get_delta_weight(name).double()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item(), msg=p)


def test_locon_features_equal_the_hand_merge(tiny_run):
    _, got, base, want = tiny_run
    assert_equal_to_hand_merge(got, want, base, rel=1e-5)


def ldm_named(modules: dict, unet_config) -> dict[str, torch.Tensor]:
    """The LoCon under A1111/LDM UNet names (``lora_unet_input_blocks_4_0_in_layers_2``), named by the
    test's own LDM map (tests/ldm_format.py), not csdiff's."""
    prefixes = unet_prefix_map(unet_config)
    renamed = {
        _convert({f"{p}.weight": None}, prefixes, "", "unet").popitem()[0].removesuffix(".weight"): pair
        for p, pair in modules["unet"].items()
    }
    tensors = kohya_tensors({"text_encoder": modules["text_encoder"]})
    for ldm, (down, up, alpha) in renamed.items():
        name = f"lora_unet_{ldm.replace('.', '_')}"
        tensors.update(
            {
                f"{name}.lora_down.weight": down,
                f"{name}.alpha": torch.tensor(alpha),
                f"{name}.lora_up.weight": up[:, :, None, None] if down.ndim == 4 else up,
            }
        )
    return tensors


def test_ldm_named_locon_loads_the_same_modules_and_weights(tiny_locon, tiny_run, tmp_path):
    """diffusers' LDM remap alone fails on this file (input_blocks_1 also matches input_blocks_10/11)
    and would put up_blocks.0's upsampler in ``attentions``; csdiff renames LDM keys itself."""
    modules, path = tiny_locon
    ex = tiny_run[0]
    tensors = ldm_named(modules, ex.unet.config)
    assert "lora_unet_output_blocks_2_1_conv.lora_down.weight" in tensors  # up_blocks.0's upsampler
    assert "lora_unet_input_blocks_10_0_in_layers_2.lora_down.weight" in tensors
    save_file(tensors, str(tmp_path / "locon_ldm.safetensors"))
    kohya_name, ldm_name = ex.loras.load(str(path)), ex.loras.load(str(tmp_path / "locon_ldm.safetensors"))
    ex.loras.activate([LoRA(str(path), 1.0), LoRA(str(tmp_path / "locon_ldm.safetensors"), 1.0)])
    for model in (ex.unet, ex.text_encoder):
        a, b = adapted(model, kohya_name), adapted(model, ldm_name)
        assert set(a) == set(b) and len(a) in (277, 12)
        for p in a:
            assert torch.equal(a[p].lora_A[kohya_name].weight, b[p].lora_A[ldm_name].weight), p
            assert torch.equal(a[p].lora_B[kohya_name].weight, b[p].lora_B[ldm_name].weight), p
            assert a[p].scaling[kohya_name] == b[p].scaling[ldm_name] == 1.0


def test_load_check_catches_a_misplaced_or_extra_module(tiny_locon, tiny_run):
    """The after-load comparison that guards against diffusers' converter: a module that holds
    other weights than the file's, or one adapted but not in the file, is reported."""
    modules, path = tiny_locon
    ex = tiny_run[0]
    name = ex.loras.load(str(path))
    ex.loras.activate([LoRA(str(path), 1.0)])  # the check runs at load time, when the scaling is 1
    models = {"unet": ex.unet, "text_encoder": ex.text_encoder}
    assert lora_module._misloaded(name, modules, models) == []
    q, conv = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.0.upsamplers.0.conv"
    down, up, alpha = modules["unet"][q]
    tampered = {"unet": {**modules["unet"], q: (down, -up, alpha)}, "text_encoder": modules["text_encoder"]}
    del tampered["unet"][conv]
    assert lora_module._misloaded(name, tampered, models) == [
        f"unet.{conv} adapted but not in the file",
        f"unet.{q} holds other weights than the file's",
    ]


# --- refusals: whole files or nothing -----------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_parts():
    """A tiny model of the tests' own: refused files are tried on it, and must leave nothing behind."""
    return load_sd_components("tiny")


CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # (32, 32, 3, 3)
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # (32, 32)


def _pair(name: str, shape: tuple[int, ...], rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(len(name))
    return {
        f"{name}.lora_down.weight": torch.randn(rank, *shape[1:], generator=g),
        f"{name}.lora_up.weight": torch.randn(shape[0], rank, *(1,) * (len(shape) - 2), generator=g),
        f"{name}.alpha": torch.tensor(float(rank)),
    }


def _loha() -> dict[str, torch.Tensor]:
    return {
        f"{CONV}.hada_w1_a": torch.randn(32, 4),
        f"{CONV}.hada_w1_b": torch.randn(4, 288),
        f"{CONV}.hada_w2_a": torch.randn(32, 4),
        f"{CONV}.hada_w2_b": torch.randn(4, 288),
        f"{CONV}.alpha": torch.tensor(4.0),
        **_pair(Q, (32, 32)),
    }


def _lokr() -> dict[str, torch.Tensor]:
    return {
        f"{CONV}.lokr_w1": torch.randn(4, 4),
        f"{CONV}.lokr_w2": torch.randn(8, 72),
        f"{CONV}.alpha": torch.tensor(4.0),
    }


REFUSED = {
    # file -> (tensors, words the message must hold)
    "loha": (_loha, ["LyCORIS LoHa", f"{CONV}.hada_w1_a", "(4 keys)"]),
    "lokr": (_lokr, ["LyCORIS LoKr", f"{CONV}.lokr_w1", f"{CONV}.lokr_w2", "(2 keys)"]),
    "dora": (
        lambda: {**_pair(Q, (32, 32)), f"{Q}.dora_scale": torch.ones(1, 32)},
        ["DoRA", f"{Q}.dora_scale", "(1 key)"],
    ),
    "unknown_suffix": (
        lambda: {**_pair(Q, (32, 32)), f"{Q}.lora_gate.weight": torch.ones(4)},
        ["keys csdiff does not apply", f"{Q}.lora_gate.weight", "(1 key)"],
    ),
    "unknown_module": (
        lambda: {
            **_pair(Q, (32, 32)),
            **_pair(f"{CONV}x", (32, 32, 3, 3)),
            **_pair("lora_te_text_model_nowhere", (64, 64)),
        },
        ["names modules this backbone does not have", f"{CONV}x.alpha", "lora_te_text_model_nowhere.alpha", "(6 keys)"],
    ),
    "wrong_shape": (
        lambda: {**_pair(Q, (32, 32)), **_pair(CONV, (32, 32, 1, 1))},
        ["does not fit", CONV, "(32, 32, 3, 3)"],
    ),
    "diffusers_unknown_module": (
        lambda: {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_A.weight": torch.randn(4, 32),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_B.weight": torch.randn(32, 4),
        },
        ["did not load as written", "unet: 2 modules named, 1 adapted"],
    ),
    "diffusers_alpha": (  # diffusers ignores it (scaling 1 instead of 2)
        lambda: {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.alpha": torch.tensor(8.0),
        },
        ["keys csdiff does not apply", "attn1.to_q.alpha", "(1 key)"],
    ),
    "diffusers_unknown_key": (
        lambda: {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4),
            "vae.encoder.conv_in.lora_A.weight": torch.randn(4, 27),
        },
        ["keys csdiff does not apply", "vae.encoder.conv_in.lora_A.weight", "(1 key)"],
    ),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_whole_in_one_line_naming_the_keys(kind, fresh_parts, tmp_path):
    make, words = REFUSED[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file(make(), str(path))
    registry = LoRARegistry(fresh_parts.unet, {"text_encoder": fresh_parts.text_encoder})
    assert_refused_in_one_line(registry, path, words)
    for model in (fresh_parts.unet, fresh_parts.text_encoder):  # nothing of it stays loaded
        assert not any(isinstance(m, BaseTunerLayer) and m.lora_A for m in model.modules()), kind
        assert not getattr(model, "peft_config", {}), kind
    assert not registry.adapters


# --- SD 1.5 widths -------------------------------------------------------------------------------


# attention block (1×1 proj_in/out, attention and feed-forward linears), a resnet with its 1×1
# shortcut, both samplers and a 1280-wide mid resnet (3×3 convs, time_emb_proj)
SD15_PARTS = (
    "down_blocks.1.attentions.0.",
    "down_blocks.1.resnets.0.",
    "down_blocks.1.downsamplers.",
    "up_blocks.1.upsamplers.",
    "mid_block.resnets.0.",
)


def test_locon_at_sd15_widths_equals_the_hand_merge(two_threads, images, tmp_path):
    """random-sd15: a LoCon on a subset of the UNet's targets that holds every kind (SD15_PARTS; a
    full LoCon merged by hand costs a minute here, and the text encoder's Linear layers are as on
    tiny). One extractor (two SD-size models would double the memory): its plain variant, with
    adapters switched off, runs again once the LoCon is merged by hand into its base weights."""
    unet = random_unet(torch.float32)  # the extractor's UNet weights (seeded), to size the LoCon
    modules = {
        "unet": {
            p: v for p, v in random_locon(unet, rank=4, alpha=2.0, seed=12)["unet"].items() if p.startswith(SD15_PARTS)
        }
    }
    del unet
    kinds = {tuple(down.shape[2:]) for down, _, _ in modules["unet"].values()}
    assert kinds == {(), (1, 1), (3, 3)} and len(modules["unet"]) == 21
    assert {
        "down_blocks.1.downsamplers.0.conv",
        "up_blocks.1.upsamplers.0.conv",
        "mid_block.resnets.0.time_emb_proj",
        "down_blocks.1.resnets.0.conv_shortcut",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    } <= set(modules["unet"])
    path = save_kohya_lora(tmp_path / "locon_sd15.safetensors", modules)
    variants = [Variant("locon", PROMPT, loras=[LoRA(str(path), SCALE)]), Variant("plain", PROMPT)]
    ex = DiffusionFeatureExtractor("random-sd15", LAYERS[1:], img_size=64, variants=variants)
    assert set(adapted(ex.unet, ex.loras.load(str(path)))) == set(modules["unet"])
    first = ex(images)
    merge_lora_by_hand({"unet": ex.unet}, modules, SCALE)
    want = ex(images, variants=["plain"])["plain"]
    assert_equal_to_hand_merge(first["locon"], want, first["plain"], rel=1e-5)
