"""guided-diffusion ADM checkpoints in diffusers, and DDPM-segmentation's features from them.

The reference is guided-diffusion itself, re-written here on the raw state dict (openai/
guided-diffusion at 22e0df8): its ``UNetModel.__init__`` walk (guided_diffusion/unet.py, lines
470-616) names the weights; its ``forward`` (634-663) with ``ResBlock._forward`` (236-257),
``AttentionBlock._forward`` + ``QKVAttentionLegacy`` (299-354) and nn.py's ``GroupNorm32`` and
``timestep_embedding`` (17-19, 103-121) computes the blocks; ``q_sample`` and the linear
schedule come from gaussian_diffusion.py (27-35, 188-206, 895-908). From yandex-research/
ddpm-segmentation: the hooked output blocks (src/feature_extractors.py ``FeatureExtractorDDPM``,
72-123), one shared noise map (train_interpreter.py, 36-41) and ``collect_features`` (234-246).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FP16_RTOL, assert_close_up_to_rounding, load_script
from torch import Tensor

from csdiff.backbone.adm import (
    LSUN_256,
    ADMCheckpointError,
    ADMConfig,
    build_unet,
    convert_state_dict,
    load_adm_unet,
)
from csdiff.backbone.adm_features import (
    PAPER_BLOCKS,
    ADMFeatureExtractor,
    feature_shapes,
)
from csdiff.backbone.loading import BackboneNotAvailableError

# small widths, the LSUN structure: resblock up/down, scale-shift norm, attention at 16² and 8²
# with 4 heads of 16 channels (the legacy qkv order matters), a channel change, learned sigma
TINY = ADMConfig(
    image_size=32,
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16, 8),
    num_head_channels=16,
    learn_sigma=True,
)


# --- guided-diffusion's structure, weights and forward, by hand ------------------------------------


def guided_structure(cfg: ADMConfig) -> tuple[list, list, list, int]:
    """input_blocks, middle_block, output_blocks as lists of layers, and the last width, as
    guided-diffusion's UNetModel.__init__ builds them (resblock_updown=True). A layer is
    ("conv", in, out), ("res", in, out, None | "up" | "down") or ("attn", channels)."""
    attention_ds = {cfg.image_size // r for r in cfg.attention_resolutions}
    ch = cfg.model_channels
    inputs, chans, ds = [[("conv", cfg.in_channels, ch)]], [ch], 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [("res", ch, mult * cfg.model_channels, None)]
            ch = mult * cfg.model_channels
            if ds in attention_ds:
                layers.append(("attn", ch))
            inputs.append(layers)
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            inputs.append([("res", ch, ch, "down")])
            chans.append(ch)
            ds *= 2
    middle = [("res", ch, ch, None), ("attn", ch), ("res", ch, ch, None)]
    outputs = []
    for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
        for i in range(cfg.num_res_blocks + 1):
            layers = [("res", ch + chans.pop(), cfg.model_channels * mult, None)]
            ch = cfg.model_channels * mult
            if ds in attention_ds:
                layers.append(("attn", ch))
            if level and i == cfg.num_res_blocks:
                layers.append(("res", ch, ch, "up"))
                ds //= 2
            outputs.append(layers)
    return inputs, middle, outputs, ch


def adm_state_dict(cfg: ADMConfig, seed: int = 0, device: str = "cpu") -> dict[str, Tensor]:
    """Random weights under guided-diffusion's key names (no zero-initialised convs, so that every
    weight shows in the output); ``device="meta"``: shapes only."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}

    def rand(shape: tuple, scale: float, offset: float = 0.0) -> Tensor:
        if device == "meta":
            return torch.empty(shape, device="meta")
        return offset + scale * torch.randn(shape, generator=g)

    def conv(name: str, cin: int, cout: int, k: int = 3, dims: int = 2) -> None:
        shape = (cout, cin, *([k] * dims))
        sd[f"{name}.weight"] = rand(shape, 1 / math.sqrt(cin * k**dims))
        sd[f"{name}.bias"] = rand((cout,), 0.1)

    def norm(name: str, c: int) -> None:
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rand((c,), 0.1, 1.0), rand((c,), 0.1)

    emb = 4 * cfg.model_channels

    def layer(name: str, spec: tuple) -> None:
        if spec[0] == "conv":
            conv(name, spec[1], spec[2])
        elif spec[0] == "res":
            _, cin, cout, _ = spec
            norm(f"{name}.in_layers.0", cin)
            conv(f"{name}.in_layers.2", cin, cout)
            sd[f"{name}.emb_layers.1.weight"] = rand((2 * cout, emb), 1 / math.sqrt(emb))
            sd[f"{name}.emb_layers.1.bias"] = rand((2 * cout,), 0.1)
            norm(f"{name}.out_layers.0", cout)
            conv(f"{name}.out_layers.3", cout, cout)
            if cin != cout:
                conv(f"{name}.skip_connection", cin, cout, k=1)
        else:
            norm(f"{name}.norm", spec[1])
            conv(f"{name}.qkv", spec[1], 3 * spec[1], k=1, dims=1)
            conv(f"{name}.proj_out", spec[1], spec[1], k=1, dims=1)

    inputs, middle, outputs, ch = guided_structure(cfg)
    sd["time_embed.0.weight"], sd["time_embed.0.bias"] = (
        rand((emb, cfg.model_channels), cfg.model_channels**-0.5),
        rand((emb,), 0.1),
    )
    sd["time_embed.2.weight"], sd["time_embed.2.bias"] = rand((emb, emb), emb**-0.5), rand((emb,), 0.1)
    for group, blocks in (("input_blocks", inputs), ("output_blocks", outputs)):
        for n, layers in enumerate(blocks):
            for k, spec in enumerate(layers):
                layer(f"{group}.{n}.{k}", spec)
    for k, spec in enumerate(middle):
        layer(f"middle_block.{k}", spec)
    norm("out.0", ch)
    conv("out.2", ch, 2 * cfg.in_channels if cfg.learn_sigma else cfg.in_channels)
    return sd


def group_norm(sd: dict, name: str, x: Tensor) -> Tensor:
    return F.group_norm(x.float(), 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)  # GroupNorm32


def res_block(sd: dict, name: str, x: Tensor, emb: Tensor, updown: str | None) -> Tensor:
    h = F.silu(group_norm(sd, f"{name}.in_layers.0", x))
    if updown == "up":
        h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
    elif updown == "down":
        h, x = F.avg_pool2d(h, 2, 2), F.avg_pool2d(x, 2, 2)
    h = F.conv2d(h, sd[f"{name}.in_layers.2.weight"], sd[f"{name}.in_layers.2.bias"], padding=1)
    scale, shift = F.linear(F.silu(emb), sd[f"{name}.emb_layers.1.weight"], sd[f"{name}.emb_layers.1.bias"])[
        ..., None, None
    ].chunk(2, dim=1)
    h = group_norm(sd, f"{name}.out_layers.0", h) * (1 + scale) + shift
    h = F.conv2d(F.silu(h), sd[f"{name}.out_layers.3.weight"], sd[f"{name}.out_layers.3.bias"], padding=1)
    if f"{name}.skip_connection.weight" in sd:
        x = F.conv2d(x, sd[f"{name}.skip_connection.weight"], sd[f"{name}.skip_connection.bias"])
    return x + h


def attention_block(sd: dict, name: str, x: Tensor, head_channels: int) -> Tensor:
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    qkv = F.conv1d(group_norm(sd, f"{name}.norm", x), sd[f"{name}.qkv.weight"], sd[f"{name}.qkv.bias"])
    heads = c // head_channels
    q, k, v = qkv.reshape(b * heads, 3 * head_channels, -1).split(head_channels, dim=1)  # QKVAttentionLegacy
    scale = 1 / math.sqrt(math.sqrt(head_channels))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, x.shape[-1])
    h = F.conv1d(a, sd[f"{name}.proj_out.weight"], sd[f"{name}.proj_out.bias"])
    return (x + h).reshape(b, c, *spatial)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def guided_forward(sd: dict, cfg: ADMConfig, x: Tensor, t: Tensor) -> tuple[list[Tensor], Tensor]:
    """Every output block's output, and the model output, as guided-diffusion computes them."""
    inputs, middle, outputs, _ = guided_structure(cfg)
    emb = F.linear(
        F.silu(F.linear(timestep_embedding(t, cfg.model_channels), sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
        sd["time_embed.2.weight"],
        sd["time_embed.2.bias"],
    )

    def run(prefix: str, layers: list, h: Tensor) -> Tensor:
        for k, spec in enumerate(layers):
            name = f"{prefix}.{k}"
            if spec[0] == "conv":
                h = F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)
            elif spec[0] == "res":
                h = res_block(sd, name, h, emb, spec[3])
            else:
                h = attention_block(sd, name, h, cfg.num_head_channels)
        return h

    hs, h = [], x
    for n, layers in enumerate(inputs):
        h = run(f"input_blocks.{n}", layers, h)
        hs.append(h)
    h = run("middle_block", middle, h)
    blocks = []
    for n, layers in enumerate(outputs):
        h = run(f"output_blocks.{n}", layers, torch.cat([h, hs.pop()], dim=1))
        blocks.append(h)
    out = F.conv2d(F.silu(group_norm(sd, "out.0", h)), sd["out.2.weight"], sd["out.2.bias"], padding=1)
    return blocks, out


def guided_q_sample(x: Tensor, t: int, noise: Tensor) -> Tensor:
    betas = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)  # get_named_beta_schedule("linear", 1000)
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    keep = torch.from_numpy(np.sqrt(alphas_cumprod))[t].float()
    spread = torch.from_numpy(np.sqrt(1.0 - alphas_cumprod))[t].float()
    return keep * x + spread * noise


def images(n: int, size: int, seed: int = 1) -> Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, Tensor]]:
    sd = adm_state_dict(TINY)
    path = tmp_path_factory.mktemp("adm") / "tiny_adm.pt"
    torch.save(sd, path)
    return path, sd


# --- loading ------------------------------------------------------------------------------------


def test_loaded_unet_computes_what_guided_diffusion_computes(tiny_checkpoint):
    path, sd = tiny_checkpoint
    unet = load_adm_unet(path, TINY)
    assert not any(p.is_meta for p in unet.parameters()) and sum(p.numel() for p in unet.parameters()) == sum(
        t.numel() for t in sd.values()
    )
    x, t = images(2, 32), torch.tensor([50, 700])
    _, want = guided_forward(sd, TINY, x, t)
    with torch.no_grad():
        got = unet(x, t).sample
    assert got.shape == (2, 6, 32, 32)
    assert_close_up_to_rounding(got, want)


def test_every_output_block_equals_guided_diffusions(tiny_checkpoint):
    path, sd = tiny_checkpoint
    blocks = range(TINY.num_output_blocks)
    extractor = ADMFeatureExtractor(path, blocks=blocks, timestep=50, seed=3, config=TINY)
    x = images(2, 32)
    got = extractor(x)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # share_noise: one map for all
    want, _ = guided_forward(sd, TINY, guided_q_sample(x, 50, noise), torch.tensor([50, 50]))
    assert list(got) == [f"output_blocks.{i:02d}" for i in blocks]
    for i, (layer, feature) in enumerate(got.items()):
        assert_close_up_to_rounding(feature, want[i], msg=layer)


def test_features_are_upsampled_and_concatenated_as_ddpm_segmentation_does(tiny_checkpoint):
    path, sd = tiny_checkpoint
    extractor = ADMFeatureExtractor(path, blocks=[7, 1, 4], timestep=200, seed=0, config=TINY)
    x = images(3, 32, seed=5)
    got = extractor.upsampled(x)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blocks, _ = guided_forward(sd, TINY, guided_q_sample(x, 200, noise), torch.full((3,), 200))
    want = torch.cat(
        [F.interpolate(blocks[i], size=(32, 32), mode="bilinear") for i in (1, 4, 7)], dim=1
    )  # block order
    assert got.shape == (3, 64 + 64 + 32, 32, 32) and extractor.layers == [
        "output_blocks.01",
        "output_blocks.04",
        "output_blocks.07",
    ]
    assert_close_up_to_rounding(got, want)
    alone = extractor.upsampled(x[1:2])  # an image's features do not depend on its batch
    assert_close_up_to_rounding(alone, got[1:2])


def test_a_checkpoint_of_another_shape_or_architecture_is_refused(tiny_checkpoint, tmp_path):
    _, sd = tiny_checkpoint

    def refusal(state: dict, config: ADMConfig = TINY) -> str:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.pt"
        torch.save(state, bad)
        with pytest.raises(ADMCheckpointError) as err:
            load_adm_unet(bad, config)
        message = str(err.value)
        assert str(bad) in message and "\n" not in message
        return message

    wrong = dict(sd, **{"output_blocks.4.0.in_layers.2.weight": torch.zeros(64, 96, 3, 3)})
    assert (
        "output_blocks.4.0.in_layers.2.weight has shape (64, 96, 3, 3), this architecture needs (64, 128, 3, 3)"
        in refusal(wrong)
    )
    assert "unexpected key label_emb.weight" in refusal(
        dict(sd, **{"label_emb.weight": torch.zeros(1000, 128)})
    )  # class-conditional
    assert "no tensor middle_block.1.qkv.bias" in refusal(
        {k: v for k, v in sd.items() if k != "middle_block.1.qkv.bias"}
    )
    assert "input_blocks.0.0.weight has shape (64, 3, 3, 3)" in refusal(
        adm_state_dict(replace(TINY, model_channels=64))
    )  # wider
    assert "input_blocks.3.0.in_layers.2.weight has shape (64, 32, 3, 3)" in refusal(
        adm_state_dict(replace(TINY, num_res_blocks=1))
    )
    assert "this architecture needs" in refusal(sd, replace(TINY, learn_sigma=False))  # 3 outputs, not 6
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ADMCheckpointError, match="junk.pt is not a readable PyTorch checkpoint"):
        load_adm_unet(tmp_path / "junk.pt", TINY)


def test_a_missing_checkpoint_says_where_to_download_it_and_where_to_put_it(tmp_path):
    path = tmp_path / "weights" / "lsun_horse.pt"
    with pytest.raises(BackboneNotAvailableError) as err:
        ADMFeatureExtractor(path)
    message = str(err.value)
    assert (
        str(path) in message
        and "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/lsun_horse.pt" in message
    )


def test_the_lsun_models_give_2816_channels_without_allocating_weights():
    shapes = feature_shapes(LSUN_256, PAPER_BLOCKS)
    assert shapes == {
        "output_blocks.05": (1024, 32, 32),
        "output_blocks.06": (512, 32, 32),
        "output_blocks.07": (512, 32, 32),
        "output_blocks.08": (512, 64, 64),
        "output_blocks.12": (256, 128, 128),
    }
    assert sum(c for c, _, _ in shapes.values()) == 2816
    # the whole key map at LSUN size, on shapes only: every guided-diffusion tensor of an LSUN model
    # (552.8 M parameters, legacy 16-head attention) lands on a diffusers weight of its shape
    state = adm_state_dict(LSUN_256, device="meta")
    converted = convert_state_dict(state, LSUN_256, "lsun (meta)")
    unet = build_unet(LSUN_256, "meta")
    assert all(p.is_meta for p in unet.parameters()) and converted.keys() == unet.state_dict().keys()
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in unet.parameters()) == 552_814_086


# --- the feature folder -----------------------------------------------------------------------------

# image size 256 as the datasets; attention only at 8² so that the CPU test stays small
SMALL_256 = ADMConfig(
    image_size=256,
    model_channels=32,
    channel_mult=(1, 1, 1, 1, 1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_head_channels=32,
    learn_sigma=True,
)


def test_the_script_writes_a_folder_the_label_scarce_datamodule_reads(tmp_path, capsys):
    from csdiff.backbone.store import FeatureFolder
    from csdiff.data.scarce import DDPMSegDataModule

    script = load_script("extract_adm_features", "checkpoints_scripts")
    root = load_script("make_fake_ddpmseg").make_fake_ddpmseg(tmp_path / "horse_21", "horse21", num_train=2, num_test=1)
    checkpoint, config = tmp_path / "adm.pt", tmp_path / "adm.json"
    torch.save(adm_state_dict(SMALL_256, seed=4), checkpoint)
    config.write_text(json.dumps(asdict(SMALL_256)))
    out = tmp_path / "ddpm"
    args = [
        "--checkpoint",
        str(checkpoint),
        "--config",
        str(config),
        "--root",
        str(root),
        "--dataset",
        "horse21",
        "--output",
        str(out),
        "--blocks",
        "8",
        "3",
        "6",
        "--timestep",
        "100",
        "--batch_size",
        "2",
        "--device",
        "cpu",
    ]
    assert script.main(args) == 0
    assert "wrote 3 feature files" in capsys.readouterr().out
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert len(files) == 3 and files[0].startswith("test/") and (out / "manifest.json").is_file()

    # the datamodule reads it as extra features beside (here made-up) gated ones
    gated = FeatureFolder(tmp_path / "gated")
    dm = DDPMSegDataModule(
        root=str(root), dataset="horse21", features=str(gated.folder), extra_features=str(out), check=False
    )
    for name, _ in dm.feature_images():
        gated.write(name, {"plain": {"x": torch.randn(4, 8, 8)}})
    dm.setup("fit")
    dm.gated = {"variants": ["plain"], "layers": ["x"]}
    train = dm.items["train"]
    bank = dm.bank([name for name, _, _ in train])
    assert dm.extra == ["ddpm"] and bank.extra_channels == 32 + 32 + 32
    g = torch.Generator().manual_seed(0)
    image, y, x = (
        torch.randint(0, 2, (500,), generator=g),
        torch.randint(0, 256, (500,), generator=g),
        torch.randint(0, 256, (500,), generator=g),
    )
    _, extra = bank.gather(image, y, x)
    extractor = ADMFeatureExtractor(checkpoint, blocks=[3, 6, 8], timestep=100, seed=0, config=SMALL_256)
    want = extractor.upsampled(
        torch.stack([script.read(str(path)) for _, path, _ in train])
    )  # collect_features, by hand
    assert_close_up_to_rounding(extra, want[image, :, y, x], rel=FP16_RTOL)

    # run again: nothing to do; other settings: refused, the folder untouched
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert script.main(args) == 0 and "wrote 0 feature files" in capsys.readouterr().out
    assert script.main([*args, "--timestep", "50"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "timestep: 100 (folder) vs 50 (now)" in err and str(out) in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps
