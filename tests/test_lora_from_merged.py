"""checkpoints_scripts/lora_from_merged.py: a LoCon merged into a copy of tiny, factored back into a
kohya LoRA by truncated SVD, loads as an ordinary csdiff LoRA and equals the merged model; the
printed errors equal an independent computation from singular values; other architectures refused.

The script runs in-process through its ``main(argv)`` (seconds instead of a fresh interpreter).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import assert_close_up_to_rounding, load_script, random_locon, shapes_images, write_merged_copy
from ldm_format import diffusers_to_ldm_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from csdiff.backbone import DiffusionFeatureExtractor, LoRA, Variant
from csdiff.backbone.loading import load_sd_components
from csdiff.backbone.lora_factor import factor_delta
from csdiff.backbone.tiny import TINY_SD_DIR, UNET_CONFIG

PROMPT = "a red circle and a blue square on a striped background"
LAYERS = ["down-level0-repeat1-res-out", "up-level1-upsampler-out", "unet-out"]
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


lora_from_merged = load_script("lora_from_merged", "checkpoints_scripts")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = lora_from_merged.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


ROW = re.compile(
    r"^(?P<kind>\S.*?)\s{2,}(?P<n>\d+)\s+(?P<rank>\d+)\s+(?P<error>\S+)\s+(?P<worst>\S+)\s+(?P<where>\S+)$"
)


def printed_errors(out: str) -> dict[str, tuple[int, int, float]]:
    """The printed table: module type -> (modules, rank, pooled relative error)."""
    rows = [ROW.match(line) for line in out.splitlines()]
    return {m["kind"]: (int(m["n"]), int(m["rank"]), float(m["error"])) for m in rows if m}


@pytest.fixture(scope="module")
def images():
    return shapes_images(1, size=64)


@pytest.fixture(scope="module")
def merged4(tmp_path_factory, tiny_parts) -> Path:
    """tiny with a rank-4 LoCon (UNet and text encoder) merged in by hand. The packaged text encoder
    is stored in float16, so its merge is rounded to float16 (as a released float16 merge is)."""
    locon = random_locon(tiny_parts.unet, tiny_parts.text_encoder, rank=4, alpha=2.0, seed=21)
    return write_merged_copy(TINY_SD_DIR, tmp_path_factory.mktemp("merged4") / "model", locon)


@pytest.fixture(scope="module")
def merged8(tmp_path_factory, tiny_parts) -> Path:
    locon = random_locon(tiny_parts.unet, tiny_parts.text_encoder, rank=8, alpha=8.0, seed=22)
    return write_merged_copy(TINY_SD_DIR, tmp_path_factory.mktemp("merged8") / "model", locon)


@pytest.fixture(scope="module")
def full_rank(merged4, tmp_path_factory, capsys_module) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("full") / "lora.safetensors"
    # every layer of tiny has min(out, in·k·k) <= 64: rank 64 is full rank everywhere (clipped below it)
    code, printed, err = capsys_module("--base", "tiny", "--merged", str(merged4), "--rank", "64", "--output", str(out))
    assert code == 0, err
    return out, printed


@pytest.fixture(scope="module")
def capsys_module():
    """``run`` for module-scoped fixtures (pytest's capsys is function-scoped): stdout via a buffer."""
    import contextlib
    import io

    def call(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = lora_from_merged.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    return call


def test_full_rank_lora_equals_the_merged_model(full_rank, merged4, images):
    path, printed = full_rank
    assert "factored 289 changed layers" in printed and "4 unchanged layers skipped" in printed  # conv_in/out, time MLP
    errors = printed_errors(printed)
    assert set(errors) == {"attention linear", "linear", "conv3x3", "conv1x1", "text-encoder linear", "overall"}
    assert errors["overall"][0] == 289 and errors["overall"][2] < 1e-5  # float32 rounding of the stored factors
    tensors = load_file(str(path))
    downs = {k: v for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    assert len(downs) == 289
    for key, down in downs.items():  # the rank is clipped to min(out, in·k·k) per layer
        up = tensors[key.replace("lora_down", "lora_up")]
        assert down.shape[0] == min(up.shape[0], down[0].numel()) == up.shape[1], key
        assert tensors[key.replace("lora_down.weight", "alpha")].item() == down.shape[0]  # alpha = rank: scale 1
        assert down.ndim == up.ndim  # LoCon layout: (r, in, k, k) and (out, r, 1, 1) for convolutions
    ex = DiffusionFeatureExtractor(
        "tiny",
        LAYERS,
        img_size=64,
        variants=[Variant("lora", PROMPT, loras=[LoRA(str(path))]), Variant("plain", PROMPT)],
    )
    got = ex(images)
    name = ex.loras.load(str(path))
    n_adapted = sum(
        isinstance(m, BaseTunerLayer) and name in m.lora_A for m in [*ex.unet.modules(), *ex.text_encoder.modules()]
    )
    assert n_adapted == 289
    want = DiffusionFeatureExtractor(str(merged4), LAYERS, img_size=64, variants=[Variant("plain", PROMPT)])(images)[
        "plain"
    ]
    for layer in LAYERS:
        assert_close_up_to_rounding(got["lora"][layer], want[layer], rel=1e-4, msg=layer)
        assert (got["plain"][layer] - want[layer]).abs().max() > 1e-2 * want[layer].abs().max(), (
            "vacuous: the merge changes nothing"
        )


def test_rank_of_the_lora_recovers_it_up_to_the_merge_rounding(merged4, tmp_path, capsys):
    """Rank 4 recovers the rank-4 UNet deltas to float32 rounding; the text encoder's float16 merge
    leaves a noise floor that no rank-4 LoRA holds (as with the paper's float16 checkpoints)."""
    code, out, err = run(
        capsys, "--base", "tiny", "--merged", str(merged4), "--rank", "4", "--output", str(tmp_path / "r4.safetensors")
    )
    assert code == 0, err
    errors = printed_errors(out)
    for kind in ("attention linear", "linear", "conv3x3", "conv1x1"):
        assert errors[kind][2] < 1e-5, (kind, errors[kind])
    assert 1e-5 < errors["text-encoder linear"][2] < 2e-2


def independent_errors(
    base: dict[str, torch.nn.Module], merged: dict[str, torch.nn.Module], rank: int
) -> dict[str, tuple[int, float]]:
    """Eckart–Young: the best rank-r error of each ΔW is sqrt(Σ discarded σ²); pooled per type as
    sqrt(Σ_modules discarded σ² / Σ_modules σ²) — the aggregation lora_factor documents."""
    sums: dict[str, list[float]] = {}
    for component, model in base.items():
        other = dict(merged[component].named_modules())
        for path, layer in model.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            delta = other[path].weight.double() - layer.weight.double()
            if not delta.any():
                continue
            if component == "text_encoder":
                kind = "text-encoder linear"
            elif isinstance(layer, torch.nn.Conv2d):
                kind = f"conv{layer.kernel_size[0]}x{layer.kernel_size[1]}"
            else:
                kind = "attention linear" if ".attentions." in path else "linear"
            sigma_sq = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1)).square()
            for key in (kind, "overall"):
                n, discarded, total = sums.setdefault(key, [0, 0.0, 0.0])
                sums[key] = [n + 1, discarded + sigma_sq[rank:].sum().item(), total + sigma_sq.sum().item()]
    return {k: (n, (d / t) ** 0.5) for k, (n, d, t) in sums.items()}


def test_half_rank_error_equals_the_discarded_singular_values(merged8, tiny_parts, tmp_path, capsys):
    code, out, err = run(
        capsys,
        "--base",
        "tiny",
        "--merged",
        str(merged8),
        "--rank",
        "4",
        "--output",
        str(tmp_path / "half.safetensors"),
    )
    assert code == 0, err
    printed = printed_errors(out)
    merged = load_sd_components(str(merged8))
    expected = independent_errors(
        {"unet": tiny_parts.unet, "text_encoder": tiny_parts.text_encoder},
        {"unet": merged.unet, "text_encoder": merged.text_encoder},
        rank=4,
    )
    assert set(printed) == set(expected)
    for kind, (n, error) in expected.items():
        assert printed[kind][:2] == (n, 4), kind
        assert 0.1 < error < 0.9, (kind, error)  # half the rank of a random rank-8 delta: a large, non-trivial error
        assert printed[kind][2] == pytest.approx(error, rel=1e-3), kind  # printed with 5 significant digits


def test_single_file_merged_checkpoint_is_configured_by_the_base(merged4, full_rank, tmp_path, capsys):
    """A merged single-file checkpoint (LDM key names) needs a configuration: --base_model defaults
    to BASE when BASE is a folder (here `tiny`). The factors equal those of the merged folder."""
    parts = load_sd_components(str(merged4), load_vae_decoder=True)
    ckpt = tmp_path / "merged.safetensors"
    save_file(diffusers_to_ldm_state_dict(parts.unet, parts.vae, parts.text_encoder), str(ckpt))
    out = tmp_path / "from_ckpt.safetensors"
    code, printed, err = run(capsys, "--base", "tiny", "--merged", str(ckpt), "--rank", "64", "--output", str(out))
    assert code == 0, err
    assert "factored 289 changed layers" in printed
    got, want = load_file(str(out)), load_file(str(full_rank[0]))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6 * want[key].abs().max().item(), msg=key)


def other_architecture(tmp_path: Path, **changes) -> Path:
    """tiny's folder with a UNet of another configuration (seeded random weights)."""
    folder = tmp_path / "other"
    shutil.copytree(TINY_SD_DIR, folder)
    shutil.rmtree(folder / "unet")
    torch.manual_seed(0)
    UNet2DConditionModel(**{**UNET_CONFIG, **changes}).save_pretrained(folder / "unet")
    return folder


@pytest.mark.parametrize(
    "changes, first",
    [
        (dict(block_out_channels=(32, 64, 64, 96)), "has shape"),
        (dict(layers_per_block=1), "unet."),
    ],
)
def test_base_of_another_architecture_is_refused_in_one_line(merged4, tmp_path, capsys, changes, first):
    other = other_architecture(tmp_path, **changes)
    out = tmp_path / "lora.safetensors"
    code, printed, err = run(
        capsys, "--base", str(other), "--merged", str(merged4), "--rank", "4", "--output", str(out)
    )
    assert code == 2 and not out.exists()
    (line,) = [line for line in err.splitlines() if "error" in line]  # one line (the rest: loaders' progress bars)
    assert line.startswith(f"error: {merged4} does not have the architecture of the base {other}: ")
    assert first in line


def test_equal_models_and_bad_arguments_are_refused(tmp_path, capsys):
    code, _, err = run(
        capsys, "--base", "tiny", "--merged", "tiny", "--rank", "4", "--output", str(tmp_path / "x.safetensors")
    )
    assert code == 2 and "no LoRA to factor" in err
    with pytest.raises(SystemExit):
        lora_from_merged.parse_args(["--base", "tiny", "--merged", "tiny", "--rank", "0", "--output", "x.safetensors"])
    single = str(tmp_path / "a.ckpt")  # a single-file base, and no --base_model to configure it
    code, _, err = run(
        capsys, "--base", single, "--merged", "tiny", "--rank", "4", "--output", str(tmp_path / "x.safetensors")
    )
    assert code == 2 and "--base_model" in err


@pytest.mark.parametrize("shape, rank", [((3, 5), 10), ((5, 3), 2), ((4, 2, 3, 3), 100), ((6, 2, 3, 3), 3)])
def test_factor_delta_is_the_best_rank_r_approximation_clipped(shape, rank):
    g = torch.Generator().manual_seed(sum(shape))
    delta = torch.randn(shape, generator=g, dtype=torch.float64)
    down, up, error_sq, delta_sq = factor_delta(delta, rank, torch.float64)
    matrix = delta.reshape(shape[0], -1)
    r = min(rank, *matrix.shape)
    assert down.shape == (r, *shape[1:]) and up.shape == (shape[0], r)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    torch.testing.assert_close(up @ down.reshape(r, -1), best, rtol=0, atol=1e-12)
    assert error_sq == pytest.approx(s[r:].square().sum().item(), abs=1e-12) and delta_sq == pytest.approx(
        s.square().sum().item()
    )
    torch.testing.assert_close(up.norm(dim=0), down.reshape(r, -1).norm(dim=1))  # σ split evenly between the factors
