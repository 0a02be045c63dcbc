"""LoRA variants on PixArt, SD3, FLUX and DeepFloyd IF.

The reference is independent of csdiff's and diffusers' LoRA code: a deep copy of the stock
diffusers model whose weights are merged by hand (W + s·(α/r)·up@down in float64, rounded once),
called with the arguments the extractor gave its denoiser and read with a plain forward hook.
Files are written here in each family's formats: diffusers keys with peft metadata or ``.alpha``
keys, a peft adapter folder (PixArt's published LCM-LoRA is one), kohya FLUX files (a fused qkv
whose up rows are to_q, to_k, to_v).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin, SD3LoraLoaderMixin
from helpers import assert_close_up_to_rounding, assert_refused_in_one_line, load_script, shapes_images
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from csdiff.backbone import ControlNet, DiffusionFeatureExtractor, LoRA, LoRAError, Variant
from csdiff.backbone.loading import load_sd_components
from csdiff.backbone.lora import LoRARegistry

PROMPT = "a photo of a red circle and a blue square on a striped background"
SCALE = 0.7
# several adapters in one model is the design, not an accident
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
FAMILIES = ("pixart", "sd3", "flux", "if")
DENOISER = {"pixart": "transformer", "sd3": "transformer", "flux": "transformer", "if": "unet"}
# the layer each test reads and the module whose output it is (diffusion transformers: tokens on the 4×4 grid)
LAYER = {"pixart": "dit-out", "sd3": "dit-out", "flux": "dit-out", "if": "up-level1-repeat0-vit-out"}
MODULE = {"pixart": "proj_out", "sd3": "proj_out", "flux": "proj_out", "if": "up_blocks.1.attentions.0"}
# denoiser modules -> (rank, alpha); ranks and alphas differ between modules on purpose
DENOISER_MODULES = {
    "pixart": {  # alphas from the file's peft metadata (lora_alpha, alpha_pattern)
        "transformer_blocks.1.attn1.to_q": (2, 4.0),
        "transformer_blocks.2.ff.net.2": (3, 1.5),
        "proj_out": (2, 2.0),
    },
    "sd3": {  # alphas as .alpha keys
        "transformer_blocks.3.attn.to_q": (2, 4.0),
        "transformer_blocks.5.ff.net.2": (3, 1.0),
        "transformer_blocks.7.attn.add_k_proj": (2, 8.0),
        "norm_out.linear": (2, 2.0),
    },
    "if": {  # no alphas: alpha = rank; a 3×3 convolution (LoCon) among them
        "down_blocks.1.attentions.0.to_q": (2, 2.0),
        "mid_block.attentions.0.to_v": (3, 3.0),
        "up_blocks.1.resnets.0.conv1": (2, 2.0),
    },
}
# FLUX, kohya: module -> (rank, alpha, [(diffusers module, rows of up)]); None: all rows
INNER = 32  # the tiny FLUX's attention width (2 heads × 16)
FLUX_KOHYA = {
    "lora_unet_double_blocks_0_img_attn_qkv": (
        3,
        6.0,
        [(f"transformer_blocks.0.attn.to_{x}", slice(i * INNER, (i + 1) * INNER)) for i, x in enumerate("qkv")],
    ),
    "lora_unet_double_blocks_1_txt_attn_qkv": (
        2,
        1.0,
        [(f"transformer_blocks.1.attn.add_{x}_proj", slice(i * INNER, (i + 1) * INNER)) for i, x in enumerate("qkv")],
    ),
    "lora_unet_single_blocks_3_linear2": (2, 4.0, [("single_transformer_blocks.3.proj_out", None)]),
    # diffusers' converter leaves these two without their transformer. prefix, and drops the final layer's alpha
    "lora_unet_final_layer_linear": (2, 8.0, [("proj_out", None)]),
    "lora_unet_img_in": (2, 2.0, [("x_embedder", None)]),
}
# text-encoder modules -> (rank, alpha), by component
TEXT_MODULES = {
    "sd3": {
        "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": (2, 4.0)},
        "text_encoder_2": {"text_model.encoder.layers.1.mlp.fc1": (3, 1.0)},
    },
    "flux": {  # written as kohya lora_te1_… keys
        "text_encoder": {
            "text_model.encoder.layers.0.self_attn.q_proj": (2, 4.0),
            "text_model.encoder.layers.1.mlp.fc2": (3, 1.5),
        }
    },
    "if": {"text_encoder": {"encoder.block.0.layer.0.SelfAttention.q": (2, 2.0)}},  # T5; no alpha keys: α = r
}


def random_pair(weight: torch.Tensor, r: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """down (r, in[, k, k]) and up (out, r): an update about the size of the weight itself."""
    fan_in = weight[0].numel()
    down = torch.randn(r, *weight.shape[1:], generator=g) / fan_in**0.5
    up = torch.randn(weight.shape[0], r, generator=g) * weight.detach().float().std().item()
    return down, up


def own_path(model: torch.nn.Module, path: str) -> str:
    """``path`` as ``model`` names it: transformers ≥ 5 flattens CLIPTextModel (no ``text_model.``)."""
    return path if hasattr(model, "text_model") else path.removeprefix("text_model.")


def delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """(α/r)·up@down in float64, as (out, in·k·k)."""
    r = down.shape[0]
    return alpha / r * (up.reshape(up.shape[0], r).double() @ down.reshape(r, -1).double())


def merged_copy(model: torch.nn.Module, deltas: dict[str, torch.Tensor], scale: float) -> torch.nn.Module:
    """A deep copy of a stock model with W ← W + scale·delta (float64, rounded once)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for path, d in deltas.items():
            w = model.get_submodule(path).weight
            w.copy_((w.double() + scale * d.reshape(w.shape)).to(w.dtype))
    return model


def write_diffusers(path: Path, prefix: str, pairs: dict, alpha_keys: bool, metadata: dict | None = None) -> Path:
    tensors = {}
    for module, (down, up, alpha) in pairs.items():
        tensors[f"{prefix}.{module}.lora_A.weight"] = down.contiguous()
        tensors[f"{prefix}.{module}.lora_B.weight"] = (up[:, :, None, None] if down.ndim == 4 else up).contiguous()
        if alpha_keys:
            tensors[f"{prefix}.{module}.alpha"] = torch.tensor(alpha)
    meta = {"format": "pt"} | ({"lora_adapter_metadata": json.dumps(metadata)} if metadata else {})
    save_file(tensors, str(path), metadata=meta)
    return path


def peft_config(pairs: dict) -> dict:
    """peft's LoraConfig fields for ``pairs``: the first module's rank and alpha, patterns for the rest."""
    (down, _, alpha), rest = next(iter(pairs.values())), list(pairs.items())[1:]
    r = down.shape[0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {m: d.shape[0] for m, (d, _, _) in rest if d.shape[0] != r},
        "alpha_pattern": {m: a for m, (_, _, a) in rest if a != alpha},
        "target_modules": sorted(pairs),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit-lora")
    return {f: getattr(load_script(f"make_tiny_{f}"), f"make_tiny_{f}")(root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def stock(folders):
    """Each family's stock components, never adapted (the references copy them)."""
    return {f: load_sd_components(str(folder)) for f, folder in folders.items()}


@pytest.fixture(scope="module")
def images():
    return shapes_images(1, size=64)


def flux_kohya_file(path: Path, unet: torch.nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A kohya FLUX file of :data:`FLUX_KOHYA`; returns the deltas it makes (a fused qkv: its up's rows)."""
    tensors, deltas = {}, {}
    for name, (r, alpha, targets) in FLUX_KOHYA.items():  # a fused layer's weight: its targets' stacked
        down, up = random_pair(torch.cat([unet.get_submodule(t).weight for t, _ in targets]), r, g)
        tensors |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(alpha),
        }
        full = delta(down, up, alpha)
        deltas |= {t: full if rows is None else full[rows] for t, rows in targets}
    save_file(tensors, str(path))
    return deltas


def peft_folder(folder: Path, pairs: dict, config: dict) -> Path:
    """peft's save_pretrained layout: adapter_config.json and the adapted model's own paths."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    tensors = {}
    for module, (down, up, _) in pairs.items():
        tensors |= {f"base_model.model.{module}.lora_A.weight": down, f"base_model.model.{module}.lora_B.weight": up}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def text_encoder_file(path: Path, family: str, parts, g: torch.Generator) -> dict[str, dict]:
    """The text-encoder LoRA of :data:`TEXT_MODULES` (FLUX: kohya ``lora_te1_…`` keys; IF: no
    alphas); returns its deltas by component, under the encoders' own paths."""
    tensors, deltas = {}, {}
    for component, modules in TEXT_MODULES[family].items():
        encoder = getattr(parts, component)
        deltas[component] = {}
        for module, (r, alpha) in modules.items():
            own = own_path(encoder, module)
            down, up = random_pair(encoder.get_submodule(own).weight, r, g)
            deltas[component][own] = delta(down, up, alpha)
            if family == "flux":
                name = "lora_te1_" + module.replace(".", "_")
                tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
            else:
                name = f"{component}.{module}"
                tensors |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
            if family != "if":
                tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return deltas


@pytest.fixture(scope="module")
def loras(tmp_path_factory, stock) -> dict[str, dict]:
    """Per family: ``files`` (variant name -> LoRA path) and ``deltas`` (component -> module -> delta)."""
    root = tmp_path_factory.mktemp("dit-lora-files")
    g = torch.Generator().manual_seed(0)
    out = {}
    for family in FAMILIES:
        parts, files, deltas = stock[family], {}, {}
        if family == "flux":
            files["lora"] = root / "flux_kohya.safetensors"
            deltas["transformer"] = flux_kohya_file(files["lora"], parts.unet, g)
        else:
            prefix = DENOISER[family]
            pairs = {}
            for module, (r, alpha) in DENOISER_MODULES[family].items():
                pairs[module] = (*random_pair(parts.unet.get_submodule(module).weight, r, g), alpha)
            deltas[prefix] = {m: delta(d, u, a) for m, (d, u, a) in pairs.items()}
            if family == "pixart":  # alphas in the file's peft metadata, and the same as a peft folder
                config = peft_config(pairs)
                meta = {f"transformer.{k}": v for k, v in config.items()}
                files["lora"] = write_diffusers(root / "pixart.safetensors", prefix, pairs, False, meta)
                files["peft"] = peft_folder(root / "pixart-peft", pairs, config)
            else:
                files["lora"] = write_diffusers(root / f"{family}.safetensors", prefix, pairs, family == "sd3")
        if family in TEXT_MODULES:
            files["te"] = root / f"{family}_te.safetensors"
            deltas |= text_encoder_file(files["te"], family, parts, g)
        out[family] = {"files": files, "deltas": deltas}
    return out


def variants(family: str, files: dict) -> list[Variant]:
    out = [
        Variant("plain", PROMPT),
        Variant("lora", PROMPT, loras=[LoRA(str(files["lora"]), SCALE)]),
        Variant("plain2", PROMPT, seed=1),  # batched with plain (same denoiser weights)
    ]
    if "te" in files:  # a text-encoder-only LoRA: batched with plain too
        out.append(Variant("te", PROMPT, loras=[LoRA(str(files["te"]), SCALE)]))
    if "peft" in files:
        out.append(Variant("peft", PROMPT, loras=[LoRA(str(files["peft"]), SCALE)]))
    return out


@pytest.fixture(scope="module")
def extractors(folders, loras):
    built: dict[str, DiffusionFeatureExtractor] = {}

    def get(family: str) -> DiffusionFeatureExtractor:
        if family not in built:
            built[family] = DiffusionFeatureExtractor(
                str(folders[family]), [LAYER[family]], img_size=64, variants=variants(family, loras[family]["files"])
            )
        return built[family]

    return get


def denoiser_call(ex: DiffusionFeatureExtractor, images, variant: str):
    """A variant's features and the arguments of the denoiser call that made them."""
    calls = []
    handle = ex.unet.register_forward_pre_hook(lambda m, a, kw: calls.append((a, kw)), with_kwargs=True)
    try:
        features = ex(images, variants=[variant])[variant][ex.layers[0]]
    finally:
        handle.remove()
    ((args, kwargs),) = calls
    return features, args, kwargs


def hooked(model: torch.nn.Module, family: str, args, kwargs) -> torch.Tensor:
    """The feature read off ``model`` with a plain forward hook on the layer's module."""
    seen = []
    handle = model.get_submodule(MODULE[family]).register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        model(*args, **kwargs)
    handle.remove()
    out = seen[0] if torch.is_tensor(seen[0]) else seen[0][0]
    return out if family == "if" else out.transpose(1, 2).reshape(out.shape[0], -1, 4, 4)


def assert_unchanged(models, before: list[dict]) -> None:
    for model, state in zip(models, before):
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
        assert not getattr(model, "peft_config", {}) and not getattr(model, "_hf_peft_config_loaded", False)
        now = model.state_dict()
        assert list(now) == list(state)
        assert all(torch.equal(now[k], v) for k, v in state.items())


# --- (1) features equal the hand-merged stock model; (2) the LoRA-free variant is the stock model ---


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_features_equal_the_hand_merged_stock_model(family, extractors, stock, loras, images):
    ex = extractors(family)
    deltas = loras[family]["deltas"][DENOISER[family]]
    got, args, kwargs = denoiser_call(ex, images, "lora")
    want = hooked(merged_copy(stock[family].unet, deltas, SCALE), family, args, kwargs)
    assert_close_up_to_rounding(got, want)
    plain = hooked(stock[family].unet, family, args, kwargs)  # the same inputs, the stock weights
    assert (want - plain).abs().max() > 1e-2 * plain.abs().max(), "the LoRA has no visible effect"
    if family == "pixart":  # the same LoRA as a peft adapter folder
        assert_close_up_to_rounding(denoiser_call(ex, images, "peft")[0], want)


@pytest.mark.parametrize("family", FAMILIES)
def test_variant_without_lora_is_the_stock_model_and_batches_with_others(family, extractors, stock, images):
    ex = extractors(family)
    got, args, kwargs = denoiser_call(ex, images, "plain")
    assert_close_up_to_rounding(got, hooked(stock[family].unet, family, args, kwargs))
    batched = ex(images)  # plain, plain2 (and te) in one call, lora (and peft) in another
    ex.batch_variants = False
    try:
        single = ex(images)
    finally:
        ex.batch_variants = True
    layer = LAYER[family]
    for name in batched:
        assert_close_up_to_rounding(batched[name][layer], single[name][layer], msg=name)
    assert_close_up_to_rounding(batched["plain"][layer], got)
    assert (batched["lora"][layer] - batched["plain"][layer]).abs().max() > 1e-2 * got.abs().max()
    assert ex.loras.unet_key(ex.variants[0].loras) == ()  # the LoRA-free variant: denoiser adapters off
    # (3) frozen: after loading and after every switch of adapters
    assert not any(p.requires_grad for p in ex.parameters())


# --- (5) text-encoder LoRAs: the prompt conditioning of a hand-merged text encoder ---


@pytest.mark.parametrize("family", ["sd3", "flux", "if"])
def test_text_encoder_lora_equals_the_hand_merged_encoder(family, extractors, stock, loras):
    ex = extractors(family)
    te = next(v for v in ex.variants if v.name == "te")
    got = ex._prompt(PROMPT, ex.text_key(te))
    plain = ex._prompt(PROMPT, ex.text_key(ex.variants[0]))
    parts, deltas = stock[family], loras[family]["deltas"]
    names = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(parts, n) is not None]
    encoders = tuple(
        merged_copy(getattr(parts, n), deltas[n], SCALE) if n in deltas else getattr(parts, n) for n in names
    )
    tokenizers = tuple(t for t in (parts.tokenizer, parts.tokenizer_2, parts.tokenizer_3) if t is not None)
    want = ex.family.encode(tokenizers, encoders, PROMPT)
    assert set(ex.loras.in_text_encoder) == {ex.loras.load(te.loras[0].path)} and not ex.loras.unet_key(te.loras)
    changed = False
    for g, w, p in zip(got, want, plain):
        if g is None or not g.is_floating_point():  # no pooled embedding / an attention mask
            continue
        assert_close_up_to_rounding(g, w)
        changed |= bool((w - p).abs().max() > 1e-2 * p.abs().max())
    assert changed, "the text-encoder LoRA has no visible effect"
    if family == "flux":  # CLIP-L gives FLUX's pooled embedding only; T5's tokens stay
        assert torch.equal(got[0], plain[0]) and not torch.equal(got[1], plain[1])
    assert not any(p.requires_grad for p in ex.parameters())


# --- ControlNet residuals and a transformer LoRA in one call ---


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_controlnet_variant_with_a_transformer_lora(family, folders, stock, loras, images, tmp_path):
    make = load_script(f"make_tiny_{family}")
    net = getattr(make, f"make_tiny_{family}_controlnet")(tmp_path / "cn")
    cn = [ControlNet(str(net))]
    lora = [LoRA(str(loras[family]["files"]["lora"]), SCALE)]
    ex = DiffusionFeatureExtractor(
        str(folders[family]),
        [LAYER[family]],
        img_size=64,
        variants=[Variant("cn", PROMPT, controlnets=cn), Variant("cn_lora", PROMPT, controlnets=cn, loras=lora)],
    )
    got, args, kwargs = denoiser_call(ex, images, "cn_lora")
    samples = kwargs.get("block_controlnet_hidden_states") or kwargs.get("controlnet_block_samples")
    assert samples is not None and any(s.abs().max() > 0 for s in samples)  # the residuals reach the call
    merged = merged_copy(stock[family].unet, loras[family]["deltas"]["transformer"], SCALE)
    assert_close_up_to_rounding(got, hooked(merged, family, args, kwargs))
    without = denoiser_call(ex, images, "cn")
    assert_close_up_to_rounding(without[0], hooked(stock[family].unet, family, without[1], without[2]))
    assert (got - without[0]).abs().max() > 1e-2 * got.abs().max()


# --- (4) files for another family, or that would not load as written: refused, model unchanged ---


def _sd_kohya(path: Path) -> Path:
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    save_file(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)}, str(path)
    )
    return path


def _diffusers(prefix: str, modules: dict[str, tuple[int, int]]):
    def write(path: Path) -> Path:
        tensors = {}
        for module, (n_out, n_in) in modules.items():
            tensors[f"{prefix}.{module}.lora_A.weight"] = torch.randn(2, n_in)
            tensors[f"{prefix}.{module}.lora_B.weight"] = torch.randn(n_out, 2)
        save_file(tensors, str(path))
        return path

    return write


REFUSED = {
    "sd_kohya_on_flux": ("flux", _sd_kohya, ["not a kohya FLUX LoRA", "another model family"]),
    "sd_unet_on_flux": (
        "flux",
        _diffusers("unet", {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32)}),
        ["adapts zero modules of this flux backbone", "unet.down_blocks", "another model family"],
    ),
    "flux_on_sd3": (
        "sd3",
        _diffusers("transformer", {"single_transformer_blocks.3.proj_out": (32, 160)}),
        ["adapts zero modules of this sd3 backbone", "single_transformer_blocks.3.proj_out", "another model family"],
    ),
    "sd3_on_pixart": (
        "pixart",
        _diffusers("transformer", {"transformer_blocks.3.attn.to_q": (32, 32)}),
        ["adapts zero modules of this pixart backbone", "another model family"],
    ),
    "sd3_on_if": (
        "if",
        _diffusers("transformer", {"transformer_blocks.3.attn.to_q": (32, 32)}),
        ["adapts zero modules of this if backbone", "no key starts with unet. / text_encoder.", "another model family"],
    ),
    "one_module_missing": (
        "pixart",
        _diffusers(
            "transformer", {"transformer_blocks.1.attn1.to_q": (48, 48), "transformer_blocks.1.attn3.to_q": (48, 48)}
        ),
        ["names modules not in this pixart backbone", "transformer.transformer_blocks.1.attn3.to_q (1 module)"],
    ),
    "wrong_width": (
        "sd3",
        _diffusers("transformer", {"transformer_blocks.3.attn.to_q": (32, 48)}),
        ["does not fit this backbone", "down (2, 48) and up (32, 2) vs (32, 32)"],
    ),
    "t5_in_kohya_flux": (
        "flux",
        lambda p: (
            save_file(
                {
                    "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.randn(2, 32),
                    "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.randn(32, 2),
                },
                str(p),
            ),
            p,
        )[1],
        ["keys csdiff does not apply", "lora_te2_", "does not adapt T5"],
    ),
    "bfl_layout_on_flux": (
        "flux",
        lambda p: (
            save_file(
                {
                    "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(2, 32),
                    "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(96, 2),
                },
                str(p),
            ),
            p,
        )[1],
        ["adapts zero modules of this flux backbone", "BFL's, ComfyUI's or XLabs' layout", "save_lora_weights"],
    ),
    "kohya_on_if": ("if", _sd_kohya, ["kohya file", "SD 1.x/2.x/XL and FLUX only", "another model family"]),
    "bias_key": (
        "sd3",
        lambda p: (
            save_file(
                {
                    "transformer.proj_out.lora_A.weight": torch.randn(2, 32),
                    "transformer.proj_out.lora_B.weight": torch.randn(64, 2),
                    "transformer.proj_out.lora_B.bias": torch.randn(64),
                },
                str(p),
            ),
            p,
        )[1],
        ["keys csdiff does not apply", "transformer.proj_out.lora_B.bias (1 key)"],
    ),
}


def registry_on_fresh(folders, family: str):
    parts = load_sd_components(str(folders[family]))
    encoders = {"text_encoder": parts.text_encoder, "text_encoder_2": parts.text_encoder_2}
    registry = LoRARegistry(parts.unet, {k: v for k, v in encoders.items() if v is not None}, family)
    return registry, [parts.unet, *registry.text_encoders.values()]


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_whole_in_one_line_and_the_model_left_as_it_was(case, folders, tmp_path):
    family, write, words = REFUSED[case]
    path = write(tmp_path / f"{case}.safetensors")
    registry, models = registry_on_fresh(folders, family)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    assert_refused_in_one_line(registry, path, words)
    assert_unchanged(models, before)
    assert not registry.adapters and not registry.in_unet


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_file_that_loads_short_is_unloaded_and_refused(family, folders, loras, monkeypatch):
    """One module lost between the file and peft (here: by diffusers' converter, or its loader)
    is noticed after loading, and the half-loaded adapter goes again, an earlier one stays."""
    registry, models = registry_on_fresh(folders, family)
    good = registry.load(str(loras[family]["files"]["te"]))
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    if family == "flux":
        convert = FluxLoraLoaderMixin.lora_state_dict.__func__

        def lossy(cls, *a, **kw):
            state = convert(cls, *a, **kw)  # loses double block 1's add_k_proj
            return {k: v for k, v in state.items() if "transformer_blocks.1.attn.add_k_proj" not in k}

        monkeypatch.setattr(FluxLoraLoaderMixin, "lora_state_dict", classmethod(lossy))
    else:
        load = SD3LoraLoaderMixin.load_lora_into_transformer.__func__

        def lossy(cls, state_dict, *a, **kw):
            return load(cls, {k: v for k, v in state_dict.items() if ".ff." not in k}, *a, **kw)

        monkeypatch.setattr(SD3LoraLoaderMixin, "load_lora_into_transformer", classmethod(lossy))
    with pytest.raises(LoRAError, match="did not load as written, so none of it is applied"):
        registry.load(str(loras[family]["files"]["lora"]))
    assert not registry.in_unet and set(registry.adapters.values()) == {good}
    assert not any(isinstance(m, BaseTunerLayer) for m in models[0].modules())  # the denoiser: no wrapper left
    after = [m.state_dict() for m in models]
    assert all(list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in b) for a, b in zip(after, before))


def test_each_file_loads_once_fingerprinted_by_content(folders, loras, tmp_path):
    registry, _ = registry_on_fresh(folders, "pixart")
    files = loras["pixart"]["files"]
    copy_ = shutil.copy(files["lora"], tmp_path / "elsewhere.safetensors")
    name = registry.load(str(files["lora"]))
    assert registry.load(str(files["lora"])) == name and registry.fingerprint(str(copy_)) == registry.fingerprint(
        str(files["lora"])
    )
    other = shutil.copytree(files["peft"], tmp_path / "peft")
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1.0}))
    assert registry.fingerprint(str(other)) != registry.fingerprint(str(files["peft"]))  # its alphas count
    alone = shutil.copy(files["peft"] / "adapter_model.safetensors", tmp_path / "peft_weights.safetensors")
    with pytest.raises(LoRAError, match="peft adapter weights .* without their adapter_config.json"):
        registry.load(str(alone))  # peft's weights alone do not say their alphas
    assert len(registry.adapters) == 4 and registry.in_unet == set(registry.adapters.values())


# --- (6) training adapters stays SD 1.x/2.x/XL's ---


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_training_is_still_refused(family, folders):
    from csdiff.tasks import LoRATrainingTask

    with pytest.raises(ValueError, match=f"{family} model, which csdiff cannot train adapters for"):
        LoRATrainingTask(backbone={"model": str(folders[family])}, sample_every_n_steps=0)
