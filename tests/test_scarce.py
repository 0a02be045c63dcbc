"""Label-scarce segmentation end to end on the tiny backbone: feature folders written by
`csdiff extract` (one process and DDP), the pixel ensemble's fit and test through the CLI,
and the protocol's details (scored classes, pixel streams, early stop)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import FP16_RTOL, assert_close_up_to_rounding, load_script
from lightning.pytorch import Callback
from safetensors.torch import load_file, save_file

from csdiff.cli import main, run_lightning
from csdiff.data.ddpmseg import get_spec, read_ddpmseg_label
from csdiff.data.scarce import PixelStreamSampler, PixelTable
from csdiff.metrics import ScoredClassIoU

make_fake_ddpmseg = load_script("make_fake_ddpmseg").make_fake_ddpmseg
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "scarce_horse21_public.yaml"
BEDROOM_CONFIG = CONFIG.with_name("scarce_bedroom28_public.yaml")


def write_config(tmp: Path, root: Path, features: Path, base: Path = CONFIG, **model) -> Path:
    """A public config (Horse-21's by default) on the tiny backbone (64², float32), 3 members, a short fit."""
    config = yaml.safe_load(base.read_text())
    init = config["model"]["init_args"]
    init["backbone"].update(model="tiny", img_size=64, dtype="float32")
    init["variants"][1]["controlnets"][0]["model"] = "tiny-controlnet-canny"
    init.update({"num_members": 3, **model})
    config["data"]["init_args"].update(root=str(root), features=str(features), split="upstream")
    trainer = config["trainer"]
    trainer.update(max_steps=20, max_epochs=-1, accelerator="cpu", enable_progress_bar=False)
    trainer["logger"]["init_args"]["save_dir"] = str(tmp / "logs")
    path = tmp / f"scarce_{len(list(tmp.glob('scarce_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def horse(tmp_path_factory) -> Path:
    return make_fake_ddpmseg(tmp_path_factory.mktemp("ddpmseg") / "horse_21", "horse21", num_train=3, num_test=2)


@pytest.fixture(scope="module")
def extracted(horse, tmp_path_factory) -> tuple[Path, Path]:
    """`csdiff extract --config` once: (config path, feature folder)."""
    tmp = tmp_path_factory.mktemp("extracted")
    config = write_config(tmp, horse, tmp / "features")
    assert main(["extract", "--config", str(config)]) == 0
    return config, tmp / "features"


def test_extract_writes_native_fp16_files_and_a_manifest(extracted):
    from csdiff.backbone import DiffusionFeatureExtractor

    config, features = extracted
    manifest = json.loads((features / "manifest.json").read_text())
    names = sorted(manifest["images"])
    assert len(names) == 5 and names[0].startswith("test/") and names[-1].startswith("train/")
    init = yaml.safe_load(config.read_text())["model"]["init_args"]
    ex = DiffusionFeatureExtractor(layers=init["layers"], variants=init["variants"], **init["backbone"])
    shapes = ex.feature_shapes()
    assert manifest["shapes"] == {k: list(v) for k, v in shapes.items()} and manifest["extractor"]["img_size"] == 64
    for name in names:
        tensors = load_file(str(features / f"{name}.safetensors"))
        assert tensors.keys() == {f"{v}/{layer}" for v in ("fine", "canny") for layer in ex.layers}
        assert all(
            t.dtype == torch.float16 and tuple(t.shape) == shapes[k.split("/", 1)[1]] for k, t in tensors.items()
        )
    reference = ex(ex.resize(torch.as_tensor(_image(manifest["images"][names[0]]))[None]))  # the extractor, by hand
    stored = load_file(str(features / f"{names[0]}.safetensors"))
    # float32 rounding of another batch may flip a float16 rounding: one float16 step (2^-10 relative)
    assert_close_up_to_rounding(
        stored["canny/up_cross"].float(), reference["canny"]["up_cross"][0].half().float(), rel=FP16_RTOL
    )


def _image(path: str) -> np.ndarray:
    import cv2

    return (
        np.ascontiguousarray(cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB).transpose(2, 0, 1), np.float32) / 127.5
        - 1
    )


def test_fit_and_test_read_the_folder_without_extracting_again(extracted, tmp_path):
    config, features = extracted
    stamps = {p: p.stat().st_mtime_ns for p in features.rglob("*.safetensors")}
    cli = run_lightning(["fit", "--config", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.trainer.global_step == 20 and "train/loss" in cli.trainer.callback_metrics
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert 0 <= result[0]["test/mIoU"] <= 1
    assert {p: p.stat().st_mtime_ns for p in features.rglob("*.safetensors")} == stamps
    report = json.loads(next(tmp_path.rglob("scarce_report.json")).read_text())
    assert report["dataset"] == "horse21" and list(report["IoU"]) == list(get_spec("horse21").class_names)
    # the checkpoint holds the ensemble and the stoppers, never the backbone
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert ckpt["state_dict"] and not any(k.startswith("extractor.") for k in ckpt["state_dict"])
    assert len(ckpt["csdiff_stoppers"]) == 3


def test_missing_features_are_extracted_on_first_use(horse, tmp_path):
    config = write_config(tmp_path, horse, tmp_path / "cache", num_members=1)
    cli = run_lightning(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    assert cli.trainer.global_step == 2
    assert (
        len(list((tmp_path / "cache").rglob("*.safetensors"))) == 5 and (tmp_path / "cache" / "manifest.json").is_file()
    )


def test_a_folder_of_other_features_is_refused(extracted, tmp_path, capsys):
    config, features = extracted
    other = write_config(
        tmp_path,
        Path(yaml.safe_load(config.read_text())["data"]["init_args"]["root"]),
        features,
        layers=["up-level1-upsampler-out"],
    )
    assert main(["fit", "--config", str(other)]) == 1
    line = capsys.readouterr().err
    assert str(features) in line and "layers" in line and "(folder)" in line
    assert main(["extract", "--config", str(config), "--model.init_args.backbone.timestep", "40"]) == 1
    assert "timestep: 50 (folder) vs 40 (now)" in capsys.readouterr().err


def test_ddp_extract_writes_each_image_once_and_equals_one_process(extracted, tmp_path):
    """2 CPU processes (gloo): each rank writes its own images; the files equal one process's."""
    config, single = extracted
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "csdiff",
        "extract",
        "--config",
        str(config),
        "--output",
        str(out),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = [int(n) for n in re.findall(r"rank \d+ wrote (\d+) feature files", proc.stdout + proc.stderr)]
    assert sorted(counts) == [2, 3]  # 5 images over 2 ranks, none twice
    for path in sorted(single.glob("**/*.safetensors")):
        a, b = load_file(str(path)), load_file(str(out / path.relative_to(single)))
        assert a.keys() == b.keys()
        for k in a:  # other processes and batches: float32 rounding, then one float16 step at most
            assert_close_up_to_rounding(a[k].float(), b[k].float(), rel=FP16_RTOL, msg=f"{path.name} {k}")


def test_extra_features_line_up_with_the_labels_and_are_learnt(extracted, tmp_path):
    """An extra source, concatenated after the gate: here an oracle (each image's one-hot label at
    256²). Gathered for a training batch and for a whole test image it must give back the labels
    exactly (pixel alignment of the streams, the bank and the test map); the members learn from it."""
    config, features = extracted
    manifest = json.loads((features / "manifest.json").read_text())
    labels = {}
    for name, path in manifest["images"].items():
        labels[name] = torch.as_tensor(np.load(Path(path).with_suffix(".npy")).astype(np.int64))
        target = tmp_path / "oracle" / f"{name}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        one_hot = torch.nn.functional.one_hot(labels[name].clamp(max=21), 22).permute(2, 0, 1)[:21].float()
        save_file({"oracle/label": one_hot.contiguous()}, str(target))
    cli = run_lightning(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.max_steps",
            "300",
            "--data.init_args.extra_features",
            str(tmp_path / "oracle"),
            "--model.init_args.extra_channels",
            "21",
            "--model.init_args.lr",
            "0.01",
        ]
    )
    dm = cli.datamodule
    assert cli.model.ensemble.members[0].mlp[0].in_features == cli.model.channels + 21
    batch = next(iter(dm.train_dataloader()))
    _, extra = dm.train_bank.gather(batch["image"], batch["y"], batch["x"])
    assert torch.equal(extra.argmax(1), batch["label"])
    name = dm.items["test"][0][0]
    bank = dm.bank([name])
    rebuilt = torch.empty(256 * 256, dtype=torch.long)
    for flat, _, extra in bank.gather_image(0, chunk=10000):
        rebuilt[flat] = extra.argmax(1)
    expected = torch.where(labels[name] == 255, 0, labels[name])  # ignore pixels: an all-zero oracle vector
    assert torch.equal(rebuilt.view(256, 256), expected)
    cli.trainer.test(cli.model, datamodule=dm)
    iou = cli.model.test_report["IoU"]
    classes = {
        split: {int(c) for n in labels if n.startswith(split) for c in labels[n].unique()} - {255}
        for split in ("train/", "test/")
    }
    common = [get_spec("horse21").class_names[c] for c in classes["train/"] & classes["test/"]]
    assert iou["background"] > 0.8 and np.mean([iou[c] for c in common]) > 0.4


def test_early_stop_ends_the_fit_when_every_member_has_stopped(extracted, tmp_path):
    config, _ = extracted
    cli = run_lightning(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.max_steps",
            "1000",
            "--model.init_args.stop_after_epoch",
            "-1",
            "--model.init_args.patience",
            "2",
        ]
    )
    assert all(s.stopped for s in cli.model.stoppers) and cli.trainer.global_step < 1000


# --- protocol details ---------------------------------------------------------------------------


def test_bedroom_scores_28_classes_and_counts_background_pixels_as_upstream():
    """Hand computation: class 0 (background) is not scored; a background pixel predicted as a
    class counts in that class's union (upstream's compute_iou masks nothing); the 26 scored
    classes absent from both count as 0 in mIoU, as there, and are left out of mIoU_present."""
    spec = get_spec("bedroom28")
    metric = ScoredClassIoU(spec.scored_classes)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    preds = torch.tensor([[1, 0, 1, 2], [2, 2, 0, 0]])
    metric.update(preds[0], target[0])
    metric.update(preds[1], target[1])
    out = metric.compute()
    # class 1: I = 1 (pixel 2), U = {0, 2, 3} = 3; class 2: I = 2, U = {3, 4, 5, 6} = 4; others absent
    assert out["IoU"][0].item() == pytest.approx(1 / 3) and out["IoU"][1].item() == pytest.approx(2 / 4)
    assert torch.isnan(out["IoU"][2:]).all() and out["IoU"].numel() == 28
    assert out["absent"].tolist() == [False, False] + [True] * 26
    # ddpm-segmentation src/pixel_classifier.py compute_iou: I / (1e-8 + U) for each of the 28 classes, then the mean
    assert out["mIoU"].item() == pytest.approx((1 / 3 + 1 / 2) / 28)
    assert out["mIoU_present"].item() == pytest.approx((1 / 3 + 1 / 2) / 2)


class PixelOrderProbe(Callback):
    """Test-only: appends "<epoch> <global step> <digest of the step's pixels>" to ``path`` per step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.current_epoch} {trainer.global_step} {_digest(batch)}\n")


def _digest(batch: dict[str, torch.Tensor]) -> str:
    return hashlib.sha1(torch.stack([batch["image"], batch["y"], batch["x"]]).numpy().tobytes()).hexdigest()


def _trace(path: Path) -> list[tuple[int, int, str]]:
    return [(int(e), int(s), d) for e, s, d in (line.split() for line in path.read_text().splitlines())]


def test_pixel_order_changes_every_epoch_and_resumed_fits_replay_it(extracted, tmp_path):
    """Upstream reshuffles the pixels every epoch (ddpm-segmentation train_interpreter.py:
    ``DataLoader(train_data, batch_size, shuffle=True, drop_last=True)``, iterated once per
    epoch, draws a new permutation each time). A 2-epoch fit must see a new order in epoch 1,
    the sampler's order of that epoch. A fit stopped after epoch 0 and resumed with
    ``--ckpt_path last``, and one resumed from a checkpoint written mid epoch 1 (what a kill
    leaves with every-N-steps saves), must train on the same batches and end with the same
    weights, bit for bit, as the uninterrupted fit (the per-pixel gate's dropout included)."""
    config_path, _ = extracted
    config = yaml.safe_load(config_path.read_text())
    per_epoch, mid = 6, 8  # epochs limited to 6 steps (of ~3000); a checkpoint after step 8, mid epoch 1
    config["trainer"].update(max_steps=-1, max_epochs=2, limit_train_batches=per_epoch)
    saves = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(tmp_path / "mid"),
            "filename": "mid",
            "every_n_train_steps": mid,
            "save_top_k": -1,
            "save_last": False,
        },
    }
    runs = {}
    for run in ("whole", "after_epoch0", "after_mid"):
        probe = {"class_path": "test_scarce.PixelOrderProbe", "init_args": {"path": str(tmp_path / f"{run}.txt")}}
        config["trainer"]["callbacks"] = (
            config["trainer"]["callbacks"][:1] + [probe] + ([saves] if run == "whole" else [])
        )
        config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / run)
        runs[run] = tmp_path / f"{run}.yaml"
        runs[run].write_text(yaml.safe_dump(config))

    whole = run_lightning(["fit", "--config", str(runs["whole"])])
    trace = _trace(tmp_path / "whole.txt")
    assert whole.trainer.num_training_batches == per_epoch
    assert [(e, s) for e, s, _ in trace] == [(s // per_epoch, s) for s in range(2 * per_epoch)]
    orders = [[d for e, _, d in trace if e == epoch] for epoch in (0, 1)]
    assert not set(orders[0]) & set(orders[1])  # epoch 1 has a new order (it had epoch 0's again)
    dm = whole.datamodule
    table = dm.train_dataloader().dataset
    sampler = PixelStreamSampler(len(table), dm.batch_size, streams=3, seed=dm.seed)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        assert [_digest(table.__getitems__(step)) for step, _ in zip(sampler, range(per_epoch))] == orders[epoch]

    after_epoch0 = str(runs["after_epoch0"])
    run_lightning(["fit", "--config", after_epoch0, "--trainer.max_epochs", "1"])
    resumed = {"after_epoch0": run_lightning(["fit", "--config", after_epoch0, "--ckpt_path", "last"])}
    assert _trace(tmp_path / "after_epoch0.txt") == trace
    resumed["after_mid"] = run_lightning(
        ["fit", "--config", str(runs["after_mid"]), "--ckpt_path", str(tmp_path / "mid" / "mid.ckpt")]
    )
    assert _trace(tmp_path / "after_mid.txt") == trace[mid:]
    want = whole.model.ensemble.state_dict()
    for cli in resumed.values():
        got = cli.model.ensemble.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        assert [vars(s) for s in cli.model.stoppers] == [vars(s) for s in whole.model.stoppers]


def _paper_compute_iou(preds: list[np.ndarray], gts: list[np.ndarray], number_class: int, ignore_label: int) -> float:
    """diffusion-content-shift scarce_segmentation_gate/segmentation/pixel_classifier.py
    ``compute_iou`` (as ddpm-segmentation's): I / (1e-8 + U) summed over the images, per id in
    range(number_class) except ignore_label, then the mean."""
    ious = []
    for c in (c for c in range(number_class) if c != ignore_label):
        inter = sum(int(((p == c) & (g == c)).sum()) for p, g in zip(preds, gts))
        union = sum(int(((p == c) | (g == c)).sum()) for p, g in zip(preds, gts))
        ious.append(inter / (1e-8 + union))
    return float(np.mean(ious))


def test_bedroom_paper_code_rule_trains_28_outputs_and_scores_background(tmp_path, capsys):
    """``class_rule: paper_code`` is the paper code's Bedroom-28 (its data_util.py
    get_dataset_setting: number_class 28, ignore_label 255): background is trained and scored,
    class 28 has no output (its pixels are ignored in training) and is not scored."""
    root = make_fake_ddpmseg(tmp_path / "bedroom_28", "bedroom28", num_train=2, num_test=1)
    for path in root.rglob("*.npy"):  # every label holds class 28
        label = np.load(path)
        label[:16, :16] = 28
        np.save(path, label)
    config = str(
        write_config(tmp_path, root, tmp_path / "features", base=BEDROOM_CONFIG, num_members=2, gate="per_channel")
    )
    paper = ["--data.init_args.class_rule", "paper_code", "--trainer.max_steps", "3"]
    assert main(["fit", "--config", config, *paper]) == 1  # the config's 29 outputs are DDPM-segmentation's rule
    assert "num_classes: 28" in capsys.readouterr().err
    cli = run_lightning(["fit", "--config", config, *paper, "--model.init_args.num_classes", "28"])
    dm, model = cli.datamodule, cli.model
    assert model.ensemble.members[0].mlp[-1].out_features == 28
    trained = dm.train_dataloader().dataset.label  # the training pixels: background in, class 28 out
    assert (trained == 0).any() and int(trained.max()) < 28
    read = read_ddpmseg_label(dm.items["train"][0][2], dm.spec)
    assert (read[:16, :16] == 255).all() and (read[16:] != 255).all()
    cli.trainer.test(model, datamodule=dm)
    report = model.test_report
    assert report["class_rule"] == "paper_code" and list(report["IoU"]) == list(get_spec("bedroom28").class_names[:28])
    model.eval()
    preds = [model.predict_image(dm.bank([name])).numpy() for name, _, _ in dm.items["test"]]
    gts = [np.load(label) for _, _, label in dm.items["test"]]  # as on disk, 28 included
    assert report["mIoU"] == pytest.approx(_paper_compute_iou(preds, gts, 28, 255), rel=1e-6)


def test_pixel_table_keeps_trainable_pixels_only():
    label = np.zeros((8, 8), np.int64)
    label[:5, :5] = 3  # 25 pixels: kept
    label[7, :4] = 4  # 4 pixels: fewer than min_pixels, ignored in this image
    label[6, :2] = 255  # ignore value
    table = PixelTable([label], ignore_index=255, min_pixels=5)
    assert len(table) == 64 - 4 - 2 and set(table.label.tolist()) == {0, 3}
    batch = table.__getitems__([0, 1])
    assert set(batch) == {"image", "y", "x", "label"} and batch["label"].tolist() == [3, 3]


def test_pixel_streams_are_independent_permutations_per_member_and_epoch():
    sampler = PixelStreamSampler(num_pixels=20, batch_size=4, streams=3, seed=7)
    steps = list(sampler)
    assert len(steps) == 5 and all(len(s) == 12 for s in steps)
    streams = [sorted(i for s in steps for i in s[4 * m : 4 * (m + 1)]) for m in range(3)]
    assert all(stream == list(range(20)) for stream in streams)  # each member sees every pixel once
    assert steps[0][:4] != steps[0][4:8]
    assert list(PixelStreamSampler(20, 4, 3, seed=7)) == steps
    sampler.set_epoch(1)
    assert list(sampler) != steps


def test_scarce_splits_runs_each_split_and_reports_mean_and_std(extracted, tmp_path, capsys):
    config, _ = extracted
    text = yaml.safe_load(config.read_text())
    text["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    text["model"]["init_args"].update(
        num_members=2, gate="per_channel"
    )  # the fast test path: splits are the point here
    path = tmp_path / "splits.yaml"
    path.write_text(yaml.safe_dump(text))
    assert main(["scarce-splits", "--config", str(path), "--seeds", "0", "1", "--trainer.max_steps", "5"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "splits.json").read_text())
    values = [r["mIoU"] for r in summary["runs"]]
    assert [r["seed"] for r in summary["runs"]] == [0, 1] and [r["split"] for r in summary["runs"]] == ["0", "1"]
    assert summary["mIoU_mean"] == pytest.approx(np.mean(values)) and summary["mIoU_std"] == pytest.approx(
        np.std(values, ddof=1)
    )
    present = [r["mIoU_present"] for r in summary["runs"]]
    assert summary["mIoU_present_mean"] == pytest.approx(np.mean(present)) and summary[
        "mIoU_present_std"
    ] == pytest.approx(np.std(present, ddof=1))
    assert f"{100 * summary['mIoU_mean']:.2f} ± {100 * summary['mIoU_std']:.2f}" in out
    assert f"{100 * summary['mIoU_present_mean']:.2f} ± {100 * summary['mIoU_present_std']:.2f}" in out
    assert (tmp_path / "splits.csv").read_text().splitlines()[0].startswith("seed,mIoU,mIoU_present,background")
    assert (tmp_path / "split0").is_dir() and (tmp_path / "split1").is_dir()


def test_manifest_follows_a_moved_dataset_but_refuses_other_images(tmp_path):
    from csdiff.backbone.store import FeatureFolder, FeatureFolderError
    from csdiff.io import save_tensors

    description = {
        "csdiff_version": "x",
        "extractor": {"layers": ["a"], "variants": [], "backbone": {"weights_id": "w"}},
        "shapes": {"a": [1, 2, 2]},
        "stored_dtype": "float16",
    }
    folder = FeatureFolder(tmp_path / "features")
    folder.prepare(description, {"train/img_0": "/data/old/real/train/img_0.png"})
    save_tensors(
        tmp_path / "features" / "train" / "img_0.safetensors", {"a": torch.zeros(1, 2, 2)}
    )  # a folder with features
    moved = folder.prepare(description, {"train/img_0": "/data/new/real/train/img_0.png"})
    assert moved["images"] == {"train/img_0": "/data/new/real/train/img_0.png"}
    assert json.loads(folder.manifest_path.read_text())["images"] == moved["images"]
    with pytest.raises(FeatureFolderError, match="other images under the same names"):
        folder.prepare(description, {"train/img_0": "/data/new/real/train/other.png"})
    with pytest.raises(FeatureFolderError, match=r"shapes: \{'a': \[1, 2, 2\]\} \(folder\) vs"):
        folder.prepare(dict(description, shapes={"a": [1, 4, 4]}), {})
