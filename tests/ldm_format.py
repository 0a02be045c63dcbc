"""Write a diffusers Stable Diffusion (SD 1.x, 2.x or SDXL) under the original LDM / SGM key names.

Test helper: it produces the kind of single-file checkpoint (``model.diffusion_model.*``,
``first_stage_model.*``, and the text encoders under their original names) that A1111 / kohya
tools and the original ``ldm`` / ``sgm`` code write, so that the single-file loading path can be
tested offline on tiny models of every family. The mapping follows the LDM architecture:

UNet (``ldm.modules.diffusionmodules.openaimodel.UNetModel``)
    ``input_blocks`` is a flat list: ``[conv_in]``, then per level ``layers_per_block`` blocks of
    ``[ResBlock, (SpatialTransformer)]`` and, except at the last level, one ``[Downsample]``
    (whose conv is called ``op``). ``middle_block`` = ``[ResBlock, SpatialTransformer, ResBlock]``.
    ``output_blocks`` holds, per level, ``layers_per_block + 1`` blocks of
    ``[ResBlock, (SpatialTransformer), (Upsample)]``; the upsampler sits in the last block of a
    level (except the last level), after the transformer when there is one.
    ResBlock internals: ``in_layers = [GroupNorm, SiLU, conv]``, ``emb_layers = [SiLU, Linear]``,
    ``out_layers = [GroupNorm, SiLU, Dropout, conv]``, ``skip_connection``.
    SpatialTransformer internals use the same names as diffusers' Transformer2DModel.
VAE (``ldm.modules.diffusionmodules.model.Encoder/Decoder``)
    ``encoder.down[i].block[j]`` / ``.downsample.conv``; ``mid.block_1``, ``mid.attn_1``
    (``norm``, ``q``, ``k``, ``v``, ``proj_out`` as 1x1 convs), ``mid.block_2``; ``norm_out``.
    The decoder's ``up`` list is indexed from the lowest resolution up in diffusers but from
    the highest resolution in LDM, hence the reversed index. Resnet shortcut: ``nin_shortcut``.
Text encoders
    SD 1.x (``FrozenCLIPEmbedder``): ``cond_stage_model.transformer`` is a transformers
    ``CLIPTextModel``, its keys unchanged under ``text_model.``. SD 2.x
    (``FrozenOpenCLIPEmbedder``): ``cond_stage_model.model`` in OpenCLIP's own names —
    ``token_embedding``, ``positional_embedding`` (a bare tensor), ``transformer.resblocks.{i}``
    with ``ln_1``, ``ln_2``, ``attn.in_proj_weight``/``_bias`` (q, k, v stacked), ``attn.out_proj``,
    ``mlp.c_fc``, ``mlp.c_proj``; ``ln_final``; ``text_projection`` (transposed, no bias). SDXL
    (``sgm`` conditioner): ``conditioner.embedders.0.transformer`` as SD 1.x and
    ``conditioner.embedders.1.model`` in OpenCLIP names. The UNet's added embedding is ``label_emb.0``.
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _per_level(value, n_levels: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n_levels
    value = list(value)
    if len(value) != n_levels:
        raise ValueError(f"expected {n_levels} per-level values, got {value}")
    return value


def _rename_children(rest: str, table: dict[str, str], where: str) -> str:
    """Rename the leading module path of ``rest`` (e.g. ``conv1.weight``) through ``table``."""
    for src, dst in table.items():
        if rest.startswith(src + "."):
            return dst + rest[len(src) :]
    raise KeyError(f"no LDM name for {where}.{rest}")


def unet_prefix_map(config) -> list[tuple[str, str, dict[str, str] | None]]:
    """(diffusers prefix, LDM prefix, child renames or None for unchanged children) for a UNet2DConditionModel."""
    n_levels = len(config.block_out_channels)
    down_layers = _per_level(config.layers_per_block, n_levels)
    up_layers = [n + 1 for n in reversed(down_layers)]
    down_attn = ["CrossAttn" in t for t in config.down_block_types]
    up_attn = ["CrossAttn" in t for t in config.up_block_types]
    if config.mid_block_type not in (None, "UNetMidBlock2DCrossAttn"):
        raise NotImplementedError(f"mid block {config.mid_block_type!r} has no SD 1.x LDM layout")

    prefixes: list[tuple[str, str, dict[str, str] | None]] = [
        ("time_embedding.linear_1", "time_embed.0", None),
        ("time_embedding.linear_2", "time_embed.2", None),
        ("conv_in", "input_blocks.0.0", None),
        ("conv_norm_out", "out.0", None),
        ("conv_out", "out.2", None),
        ("add_embedding.linear_1", "label_emb.0.0", None),
        ("add_embedding.linear_2", "label_emb.0.2", None),
        ("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
        ("mid_block.attentions.0", "middle_block.1", None),
        ("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
    ]
    index = 1  # input_blocks.0 is conv_in
    for level in range(n_levels):
        for j in range(down_layers[level]):
            prefixes.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0", _UNET_RESNET))
            if down_attn[level]:
                prefixes.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index}.1", None))
            index += 1
        if level < n_levels - 1:
            prefixes.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op", None))
            index += 1
    index = 0
    for level in range(n_levels):
        for j in range(up_layers[level]):
            prefixes.append((f"up_blocks.{level}.resnets.{j}", f"output_blocks.{index}.0", _UNET_RESNET))
            slot = 1
            if up_attn[level]:
                prefixes.append((f"up_blocks.{level}.attentions.{j}", f"output_blocks.{index}.1", None))
                slot = 2
            if j == up_layers[level] - 1 and level < n_levels - 1:
                prefixes.append((f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv", None))
            index += 1
    return prefixes


def vae_prefix_map(config) -> list[tuple[str, str, dict[str, str] | None]]:
    """(diffusers prefix, LDM prefix, child renames) for an AutoencoderKL (encoder and decoder)."""
    n_levels = len(config.block_out_channels)
    prefixes: list[tuple[str, str, dict[str, str] | None]] = [
        ("quant_conv", "quant_conv", None),
        ("post_quant_conv", "post_quant_conv", None),
    ]
    for part in ("encoder", "decoder"):
        prefixes += [
            (f"{part}.conv_in", f"{part}.conv_in", None),
            (f"{part}.conv_out", f"{part}.conv_out", None),
            (f"{part}.conv_norm_out", f"{part}.norm_out", None),
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
        ]
    enc_layers = _per_level(config.layers_per_block, n_levels)
    for i in range(n_levels):
        for j in range(enc_layers[i]):
            prefixes.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        if i < n_levels - 1:
            prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", None))
    for i in range(n_levels):
        ldm_i = n_levels - 1 - i  # LDM numbers the decoder levels from the highest resolution
        for j in range(enc_layers[ldm_i] + 1):
            prefixes.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_i}.block.{j}", _VAE_RESNET))
        if i < n_levels - 1:
            prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_i}.upsample.conv", None))
    return prefixes


def _convert(state_dict: dict[str, torch.Tensor], prefixes, out_prefix: str, what: str) -> dict[str, torch.Tensor]:
    # Longest prefix first, so that e.g. `conv_out` never shadows a longer name starting the same way.
    ordered = sorted(prefixes, key=lambda p: len(p[0]), reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        for src, dst, table in ordered:
            if key.startswith(src + "."):
                rest = key[len(src) + 1 :]
                new_rest = rest if table is None else _rename_children(rest, table, f"{what}.{src}")
                out[out_prefix + dst + "." + new_rest] = tensor
                break
        else:
            raise KeyError(f"{what} parameter {key!r} has no LDM name")
    return out


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _hf_clip(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue  # a buffer, not a weight (older transformers kept it in the state dict)
        out[prefix + (key if key.startswith("text_model.") else "text_model." + key)] = tensor
    return out


def _open_clip(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder in OpenCLIP's names (q, k, v fused into ``in_proj``)."""
    sd = {
        k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")
    }
    out = {
        prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T
    for i in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[block + f"attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(layer + f"self_attn.{p}_proj.{kind}") for p in "qkv"]
            )
            for src, dst in _OPEN_CLIP_LAYER.items():
                out[block + f"{dst}.{kind}"] = sd.pop(layer + f"{src}.{kind}")
    if sd:
        raise KeyError(f"text encoder parameters without an OpenCLIP name: {sorted(sd)}")
    return out


def diffusers_to_ldm_state_dict(
    unet, vae, text_encoder, text_encoder_2=None, open_clip: bool = False
) -> dict[str, torch.Tensor]:
    """One state dict with the original key names of the whole model (UNet, VAE, text encoders).

    SD 1.x by default; ``open_clip=True`` writes the text encoder as SD 2.x's OpenCLIP; a
    ``text_encoder_2`` makes it an SDXL checkpoint. Tensors are detached contiguous copies
    (safe for ``safetensors`` and ``torch.save``), in the models' current dtype. The VAE decoder
    is included when the VAE has one.
    """
    result: dict[str, torch.Tensor] = {}
    result.update(_convert(unet.state_dict(), unet_prefix_map(unet.config), UNET_PREFIX, "unet"))
    vae_sd = _convert(vae.state_dict(), vae_prefix_map(vae.config), VAE_PREFIX, "vae")
    for key, tensor in vae_sd.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's AttnBlock uses 1x1 convs for q, k, v, proj_out
        result[key] = tensor
    if text_encoder_2 is not None:
        result.update(_hf_clip(text_encoder, "conditioner.embedders.0.transformer."))
        result.update(_open_clip(text_encoder_2, "conditioner.embedders.1.model."))
    elif open_clip:
        result.update(_open_clip(text_encoder, "cond_stage_model.model."))
    else:
        result.update(_hf_clip(text_encoder, CLIP_PREFIX))
    return {k: v.detach().clone().contiguous() for k, v in result.items()}
