"""guided-diffusion's ADM UNets (the LSUN models DDPM-segmentation reads features from) as a
diffusers ``UNet2DModel``, loaded strictly from the original checkpoint files.

The content-shift paper concatenates DDPM-segmentation's features (``lsun_horse.pt``,
``lsun_bedroom.pt`` from openai/guided-diffusion) to its own; running them on diffusers needs
no guided-diffusion code. The key mapping follows diffusers'
``scripts/convert_consistency_to_diffusers.py`` (same topology), with two differences that
matter for these checkpoints: scale-shift norm, and the *legacy* attention order (guided-
diffusion's default, ``use_new_attention_order=False``: the fused qkv projection holds, per
head, that head's q, k, v one after another, so q/k/v are split per head, not in thirds).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn

from csdiff.backbone.loading import BackboneNotAvailableError, fingerprint_files

NORM_GROUPS = 32  # guided-diffusion's GroupNorm32
DOWNLOADS = {
    "lsun_horse.pt": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/lsun_horse.pt",
    "lsun_bedroom.pt": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/lsun_bedroom.pt",
    "lsun_cat.pt": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/lsun_cat.pt",
}


class ADMCheckpointError(ValueError):
    """A checkpoint that is not an ADM of the expected architecture; the message names the file
    and the first key that does not fit."""


@dataclass(frozen=True)
class ADMConfig:
    """guided-diffusion's ``create_model`` flags that fix the weights' layout. Always
    ``resblock_updown``, ``use_scale_shift_norm`` and the legacy attention order (the LSUN
    models'); ``attention_resolutions`` are resolutions, as on guided-diffusion's command line."""

    image_size: int = 256
    model_channels: int = 256
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    learn_sigma: bool = True
    in_channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        # diffusers embeds the timestep at block_out_channels[0]; guided-diffusion at model_channels
        if self.channel_mult[0] != 1:
            raise ValueError(f"channel_mult must start with 1 to be a diffusers UNet2DModel, got {self.channel_mult}")
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"image_size {self.image_size} does not survive {len(self.channel_mult) - 1} halvings")
        for level, width in enumerate(self.widths):
            if width % NORM_GROUPS:
                raise ValueError(
                    f"level {level} has {width} channels, not a multiple of GroupNorm's {NORM_GROUPS} groups"
                )
            if (self.has_attention(level) or level == len(self.widths) - 1) and width % self.num_head_channels:
                raise ValueError(
                    f"level {level} has {width} channels, not a multiple of num_head_channels {self.num_head_channels}"
                )

    @property
    def widths(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    def has_attention(self, level: int) -> bool:
        """guided-diffusion puts attention where the downsampling rate 2**level is image_size // r."""
        return 2**level in {self.image_size // r for r in self.attention_resolutions}

    @property
    def num_output_blocks(self) -> int:
        return len(self.channel_mult) * (self.num_res_blocks + 1)

    def summary(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


# guided-diffusion README, "LSUN models"; DDPM-segmentation's scripts/ddpm/train_interpreter.sh
LSUN_256 = ADMConfig()


def unet_kwargs(config: ADMConfig) -> dict:
    """``UNet2DModel`` arguments of the same architecture (checked weight by weight on loading)."""
    levels = range(len(config.channel_mult))
    return dict(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=2 * config.in_channels if config.learn_sigma else config.in_channels,
        layers_per_block=config.num_res_blocks,
        block_out_channels=config.widths,
        attention_head_dim=config.num_head_channels,
        down_block_types=["AttnDownBlock2D" if config.has_attention(i) else "ResnetDownsampleBlock2D" for i in levels],
        up_block_types=[
            "AttnUpBlock2D" if config.has_attention(i) else "ResnetUpsampleBlock2D" for i in reversed(levels)
        ],
        resnet_time_scale_shift="scale_shift",
        downsample_type="resnet",
        upsample_type="resnet",
        norm_num_groups=NORM_GROUPS,
        attn_norm_num_groups=NORM_GROUPS,  # diffusers leaves the mid attention unnormed with scale-shift otherwise
        norm_eps=1e-5,
        flip_sin_to_cos=True,  # guided-diffusion's embedding is [cos, sin]
        freq_shift=0,
    )


def build_unet(config: ADMConfig, device: str | torch.device = "cpu") -> UNet2DModel:
    """The diffusers UNet, randomly initialised (``device="meta"``: shapes only, no memory)."""
    with torch.device(device):
        return UNet2DModel(**unet_kwargs(config)).eval()


# --- guided-diffusion names → diffusers names ---------------------------------------------------

_RES = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
_ATTN = (("norm", "group_norm"), ("qkv", "to_q"), ("qkv", "to_k"), ("qkv", "to_v"), ("proj_out", "to_out.0"))


def _modules(config: ADMConfig) -> Iterator[tuple[str, str, tuple]]:
    """(guided-diffusion module, diffusers module, parameter pairs), walking guided-diffusion's
    ``UNetModel.__init__``: input blocks, middle block, output blocks (deepest level first)."""
    yield "time_embed.0", "time_embedding.linear_1", (("", ""),)
    yield "time_embed.2", "time_embedding.linear_2", (("", ""),)
    yield "input_blocks.0.0", "conv_in", (("", ""),)
    n, last = 1, len(config.channel_mult) - 1
    for level in range(last + 1):
        for j in range(config.num_res_blocks):
            yield f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", _RES
            if config.has_attention(level):
                yield f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", _ATTN
            n += 1
        if level != last:
            yield f"input_blocks.{n}.0", f"down_blocks.{level}.downsamplers.0", _RES
            n += 1
    yield "middle_block.0", "mid_block.resnets.0", _RES
    yield "middle_block.1", "mid_block.attentions.0", _ATTN
    yield "middle_block.2", "mid_block.resnets.1", _RES
    for up, level in enumerate(reversed(range(last + 1))):
        for j in range(config.num_res_blocks + 1):
            i, attention = up * (config.num_res_blocks + 1) + j, config.has_attention(level)
            yield f"output_blocks.{i}.0", f"up_blocks.{up}.resnets.{j}", _RES
            if attention:
                yield f"output_blocks.{i}.1", f"up_blocks.{up}.attentions.{j}", _ATTN
            if level and j == config.num_res_blocks:
                yield f"output_blocks.{i}.{2 if attention else 1}", f"up_blocks.{up}.upsamplers.0", _RES
    yield "out.0", "conv_norm_out", (("", ""),)
    yield "out.2", "conv_out", (("", ""),)


def _part(old_param: str, new_param: str) -> str | None:
    if old_param == "qkv":
        return new_param[-1]  # to_q → q
    return "squeeze" if old_param == "proj_out" else None


def _join(*names: str) -> str:
    return ".".join(name for name in names if name)


def key_sources(config: ADMConfig) -> dict[str, tuple[str, str | None]]:
    """diffusers key → (guided-diffusion key, how to take it): ``q``/``k``/``v`` (that part of
    the fused qkv, per head), ``squeeze`` (a 1×1 Conv1d as a Linear) or None (as is)."""
    return {
        _join(new, new_param, kind): (_join(old, old_param, kind), _part(old_param, new_param))
        for old, new, params in _modules(config)
        for old_param, new_param in params
        for kind in ("weight", "bias")
    }


def _source_shape(shape: torch.Size, part: str | None) -> tuple[int, ...]:
    """The guided-diffusion shape that fills a diffusers tensor of ``shape``."""
    if part in ("q", "k", "v"):
        return (3 * shape[0], *shape[1:], 1) if len(shape) == 2 else (3 * shape[0],)
    return (*shape, 1) if part == "squeeze" and len(shape) == 2 else tuple(shape)


def _take(tensor: Tensor, part: str | None, head_channels: int) -> Tensor:
    if part in ("q", "k", "v"):
        width = tensor.shape[0] // 3
        per_head = tensor.reshape(width // head_channels, 3, head_channels, *tensor.shape[1:])
        tensor = per_head[:, "qkv".index(part)].reshape(width, *tensor.shape[1:])
        return tensor[..., 0] if tensor.ndim == 3 else tensor
    return tensor[..., 0] if part == "squeeze" and tensor.ndim == 3 else tensor


def convert_state_dict(state: Mapping[str, object], config: ADMConfig, source: str = "checkpoint") -> dict[str, Tensor]:
    """A guided-diffusion state dict in diffusers names, float32. Every diffusers weight must be
    filled and every checkpoint key used, with the right shapes; otherwise one
    :class:`ADMCheckpointError` line names ``source`` and the first key that does not fit."""

    def refuse(detail: str) -> ADMCheckpointError:
        return ADMCheckpointError(
            f"{source} is not a guided-diffusion ADM checkpoint of the expected architecture ({config.summary()}): {detail}"
        )

    sources = key_sources(config)
    target = build_unet(config, "meta").state_dict()
    out, used = {}, set()
    for key, expected in target.items():
        old, part = sources[key]
        tensor = state.get(old)
        if not isinstance(tensor, Tensor):
            raise refuse(f"no tensor {old}" + ("" if old not in state else f" (it holds a {type(tensor).__name__})"))
        want = _source_shape(expected.shape, part)
        if tuple(tensor.shape) != want:
            raise refuse(f"{old} has shape {tuple(tensor.shape)}, this architecture needs {want}")
        out[key] = _take(tensor.detach().float(), part, config.num_head_channels).contiguous()
        used.add(old)
    unexpected = [k for k in state if k not in used]
    if unexpected:
        raise refuse(
            f"unexpected key {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    return out


# --- loading -----------------------------------------------------------------------------------


def missing_checkpoint_message(path: Path) -> str:
    url = DOWNLOADS.get(path.name)
    where = (
        f"download it from {url}"
        if url
        else "download the model from openai/guided-diffusion's README (" + ", ".join(DOWNLOADS.values()) + ")"
    )
    return (
        f"ADM checkpoint not found: {path}. On a machine with network access {where} "
        f"(the LSUN models DDPM-segmentation uses), then copy it to {path} or pass its path"
    )


def read_checkpoint(path: str | Path) -> dict[str, object]:
    """The state dict in a ``.pt`` file, read without running pickled code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneNotAvailableError(missing_checkpoint_message(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated download, another format: torch raises many kinds
        raise ADMCheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({' '.join(str(err).split())[:200]})"
        ) from err
    if not isinstance(state, Mapping):
        raise ADMCheckpointError(
            f"{path} holds a {type(state).__name__}, not a state dict of guided-diffusion's UNetModel"
        )
    return dict(state)


def load_adm_unet(path: str | Path, config: ADMConfig = LSUN_256) -> UNet2DModel:
    """guided-diffusion checkpoint → frozen diffusers ``UNet2DModel`` (float32, CPU), strictly."""
    converted = convert_state_dict(read_checkpoint(path), config, str(path))
    unet = build_unet(config, "meta")
    unet.load_state_dict(converted, strict=True, assign=True)
    return unet.requires_grad_(False).eval()


def weights_id(path: str | Path, config: ADMConfig) -> str:
    """Fingerprint of what the UNet computes: the file's (as csdiff's other weights) and the
    architecture's — the head width changes the features without changing the file."""
    path = Path(path).expanduser()
    return hashlib.sha256(f"{fingerprint_files([path], path)}:{config.summary()}".encode()).hexdigest()[:16]


# --- guided-diffusion's output_blocks in the diffusers UNet ----------------------------------------


def output_block_modules(unet: UNet2DModel, config: ADMConfig) -> list[nn.Module]:
    """Module ``i`` returns what guided-diffusion's ``output_blocks[i]`` returns: the block's last
    part (upsampling ResBlock, else attention, else ResBlock). The skip concatenation that
    guided-diffusion does before the block, diffusers does inside its up block, before the same
    ResBlock, so the outputs agree."""
    per_level = config.num_res_blocks + 1
    modules = []
    for i in range(config.num_output_blocks):
        up, j = divmod(i, per_level)
        block = unet.up_blocks[up]
        if j == per_level - 1 and block.upsamplers is not None:
            modules.append(block.upsamplers[0])
        elif hasattr(block, "attentions"):
            modules.append(block.attentions[j])
        else:
            modules.append(block.resnets[j])
    return modules
