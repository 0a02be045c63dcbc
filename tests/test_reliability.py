"""Reliability: what a killed, mistyped or misdirected run does, through the real entry point.

1. SIGTERM (kill, timeout, SLURM, Kubernetes) stops like Ctrl-C: `fit` saves last.ckpt and
   exits 143, `extract`/`predict`/`test` stop after the batch in progress and exit 143
   (Ctrl-C: 130), leaving only complete files.
2. `--ckpt_path` never silently drops what the config says: options that differ from the
   checkpoint's are refused in one line, those that cannot change results are applied.
6. `extract --extractor.variants` takes LoRAs and ControlNets.
7. Smaller ones: permissions, output paths, error messages, exit codes, log folders.

Signals to `fit` and `extract` go to real processes (as `kill` sends them); test/predict and
the SIGTERM that lands during validation are sent by a callback to its own process, so that
they land at an exact batch.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from safetensors.torch import load_file
from test_cli import _images
from test_resume import KILL_STEP, assert_same_weights, interrupt_and_resume, load
from test_segmentation_cli import quick_args, quick_config

from csdiff.cli import main, run_lightning

TIMEOUT_S = 300


class SignalAtFirstBatch(Callback):
    """Test-only: sends this process ``signum`` at the end of the first batch of ``stage``
    (``validate``, ``test`` or ``predict``), as `kill` would."""

    def __init__(self, stage: str, signum: int = int(signal.SIGTERM)) -> None:
        self.stage, self.signum, self.sent = stage, signum, False

    def _send(self, stage: str) -> None:
        if stage == self.stage and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        if not trainer.sanity_checking:
            self._send("validate")

    def on_test_batch_end(self, *args, **kwargs) -> None:
        self._send("test")

    def on_predict_batch_end(self, *args, **kwargs) -> None:
        self._send("predict")


def with_callback(config: str, stage: str) -> str:
    """A copy of ``config`` whose trainer also has SignalAtFirstBatch(stage)."""
    data = yaml.safe_load(Path(config).read_text())
    data["trainer"]["callbacks"].append(
        {"class_path": f"{Path(__file__).stem}.SignalAtFirstBatch", "init_args": {"stage": stage}}
    )
    path = Path(config).with_name(f"{Path(config).stem}-signal-{stage}.yaml")
    path.write_text(yaml.safe_dump(data))
    return str(path)


def fit_args(work: Path, logs: str, **extra: str) -> list[str]:
    """The shrunk quickstart: 2 epochs of 2 steps, validation of 4 single-image batches after each."""
    args = {"--trainer.logger.init_args.save_dir": str(work / logs), "--data.init_args.eval_batch_size": "1", **extra}
    return ["fit", *quick_args(work, **args), "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(work folder, last.ckpt) of one uninterrupted shrunk quickstart fit (its run: logs/version_0)."""
    work = tmp_path_factory.mktemp("reliability")
    assert main(fit_args(work, "logs")) == 0
    return work, work / "logs" / "version_0" / "checkpoints" / "last.ckpt"


def last_error(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("csdiff")]


# --- 1. signals ---


def test_sigterm_during_fit_saves_last_exits_143_and_resumes_bit_identical(work):
    """SIGTERM to a fit's whole process group (as `timeout` and SLURM send it), DataLoader worker
    included: the fit finishes its step, writes last.ckpt, exits 143 with the resume hint (the
    worker leaves the signal to it); `--ckpt_path last` ends with an uninterrupted run's weights."""
    workers = ("--data.init_args.num_workers", "1")
    reference, final, log, trace = interrupt_and_resume(
        work, "sigterm", signal.SIGTERM, "--trainer.max_epochs", "2", *workers, group=True
    )
    assert f"interrupted at epoch 1, step {KILL_STEP + 1} by SIGTERM" in log and "--ckpt_path last" in log
    assert trace.split() == ["1", str(KILL_STEP + 1)]
    assert_same_weights(final, reference)


WORKER_SCRIPT = """
import os, signal, sys
from torch.utils.data import DataLoader
from csdiff.data.samplers import leave_signals_to_main
loader = DataLoader(list(range(8)), batch_size=2, num_workers=1, worker_init_fn=leave_signals_to_main, persistent_workers=True)
batches = iter(loader)
next(batches)
print(batches._workers[0].pid, flush=True)
sys.stdin.readline()  # the test has sent the worker a SIGTERM of its own
print(next(batches).tolist(), flush=True)
leaked = [batches]
leaked.append(leaked)  # a cycle, as a trainer holds its loaders: still alive at interpreter exit
"""


def test_workers_ignore_a_strangers_sigterm_but_end_with_their_parent():
    """A worker outlives a SIGTERM from another process (the group signal the main process
    handles), yet still ends on its parent's: multiprocessing terminates leftover workers at
    interpreter exit and would wait forever for one deaf to it (a CI run once hung so)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        worker = int(proc.stdout.readline())
        os.kill(worker, signal.SIGTERM)
        time.sleep(0.5)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "[2, 3]"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)


def test_sigterm_during_validation_is_lightnings_stop_and_still_resumes(trained, capsys):
    """SIGTERM in the middle of a fit's validation: Lightning's loop stops there
    (SIGTERMException, a SystemExit that used to exit 0); last.ckpt is written at that point,
    the exit code is 143, and the resumed fit reruns the validation and ends bit-identical."""
    work, reference = trained
    config = with_callback(quick_config(work, work / "predictions"), "validate")
    assert main(fit_args(work, "cut", **{"--config": config})) == 143
    assert "interrupted at epoch 0, step 2 by SIGTERM" in last_error(capsys)[-1]
    cut = work / "cut" / "version_0" / "checkpoints" / "last.ckpt"
    assert load(cut)["global_step"] == 2
    assert main([*fit_args(work, "cut"), "--ckpt_path", "last"]) == 0
    assert_same_weights(load(cut), load(reference))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_extract_after_the_batch_and_a_rerun_finishes(tmp_path, capsys, sig):
    """kill/Ctrl-C: exit 143/130 with the hint, complete files only; the same command then
    computes just the rest."""
    _images(tmp_path / "in", 8)
    out = tmp_path / "out"
    args = [
        "extract",
        "--extractor.model",
        "tiny",
        "--extractor.img_size",
        "128",
        "--extractor.layers",
        '["legacy", "up_cross"]',
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "csdiff", *args], env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + TIMEOUT_S
    while not list(out.glob("*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    assert proc.wait(timeout=TIMEOUT_S) == 128 + sig
    line = [x for x in (tmp_path / "err.txt").read_text().splitlines() if x.startswith("csdiff")][-1]
    assert f"interrupted by {sig.name}" in line and "run the same command again" in line
    present = sorted(out.glob("*.safetensors"))
    assert 1 <= len(present) < 8, "the signal should land mid-run"
    assert f"wrote {len(present)} of 8" in line
    for path in present:
        assert len(load_file(str(path))) == 5  # complete: 4 legacy layers + up_cross
    assert not list(out.glob(".*tmp*"))
    assert main(args) == 0
    assert (
        f"wrote {8 - len(present)} feature files to {out} ({len(present)} already present)" in capsys.readouterr().out
    )


def test_sigterm_stops_predict_after_the_batch_and_test_with_143(trained, tmp_path, capsys):
    """predict writes the batch in progress, then stops (Lightning's predict loop ignores
    SIGTERM); test is stopped by Lightning's loop, and neither exits 0."""
    work, ckpt = trained
    out = tmp_path / "pred"
    predict = ["predict", *quick_args(work, **{"--config": with_callback(quick_config(work, out), "predict")})]
    assert main([*predict, "--data.init_args.eval_batch_size", "1", "--ckpt_path", str(ckpt)]) == 143
    assert "interrupted by SIGTERM after 1 batch(es)" in last_error(capsys)[-1]
    assert len(list((out / "labels").glob("*.png"))) == 1
    test = ["test", *quick_args(work, **{"--config": with_callback(quick_config(work, out), "test")})]
    assert main([*test, "--data.init_args.eval_batch_size", "1", "--ckpt_path", str(ckpt)]) == 143
    assert "interrupted by SIGTERM; test did not finish" in last_error(capsys)[-1]


# --- 2. --ckpt_path and the config ---


def test_options_that_differ_from_the_checkpoint_are_refused_in_one_line(trained, capsys):
    work, ckpt = trained
    variants = [
        {"name": "plain", "prompt": "a drawing"},
        {
            "name": "canny",
            "prompt": "a photo of shapes on a background",
            "controlnets": [{"model": "tiny-controlnet-canny"}],
        },
    ]
    code = main(
        [
            "test",
            *quick_args(work),
            "--ckpt_path",
            str(ckpt),
            "--model.init_args.backbone.timestep",
            "100",
            "--model.init_args.head_channels",
            "32",
            "--model.init_args.num_classes",
            "5",
            "--model.init_args.variants",
            json.dumps(variants),
        ]
    )
    lines = last_error(capsys)
    assert code == 1 and len(lines) == 1
    for difference in (
        "backbone.timestep: 50 (checkpoint) vs 100 (config)",
        "head_channels: 64 (checkpoint) vs 32 (config)",
        "num_classes: 4 (checkpoint) vs 5 (config)",
        "variant 'plain' prompt: a photo of shapes on a background (checkpoint) vs a drawing (config)",
    ):
        assert difference in lines[0]
    assert str(ckpt) in lines[0]


def test_neutral_options_and_moved_weights_apply_and_tests_log_beside_the_run(trained, tmp_path):
    """batch_variants, channels_last, feature_cache and (for test) lr take the config's value;
    the backbone from another folder with the same files passes the content check. A test
    logs into the checkpoint's run folder (<run>/test), not into a new version_N."""
    work, ckpt = trained
    from csdiff.backbone.tiny import TINY_SD_DIR

    moved = shutil.copytree(TINY_SD_DIR, tmp_path / "weights" / "sd")
    cli = run_lightning(
        [
            "test",
            *quick_args(work),
            "--ckpt_path",
            str(ckpt),
            "--model.init_args.backbone.batch_variants",
            "false",
            "--model.init_args.backbone.channels_last",
            "false",
            "--model.init_args.backbone.model",
            str(moved),
            "--model.init_args.feature_cache",
            str(tmp_path / "cache"),
            "--model.init_args.lr",
            "0.5",
        ]
    )
    extractor = cli.model.extractor
    assert (extractor.batch_variants, extractor.channels_last, cli.model.hparams.lr) == (False, False, 0.5)
    assert cli.model.hparams.backbone["model"] == str(moved) and cli.model.hparams.head_channels == 64
    assert list((tmp_path / "cache").rglob("*.safetensors"))
    assert Path(cli.trainer.log_dir) == ckpt.parent.parent / "test"
    assert sorted(p.name for p in (work / "logs").iterdir()) == ["version_0"]


def test_checkpoint_of_another_task_is_refused(trained, tmp_path, capsys):
    work, ckpt = trained
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["_class_path"] = "csdiff.tasks.CorrespondenceTask"
    other = tmp_path / "spair.ckpt"
    torch.save(state, other)
    assert main(["test", *quick_args(work), "--ckpt_path", str(other)]) == 1
    assert (
        f"{other} is a CorrespondenceTask checkpoint; this config builds a SegmentationTask" in last_error(capsys)[-1]
    )


# --- 6. extract with LoRA and ControlNet variants ---


def test_extract_takes_lora_and_controlnet_variants_on_the_command_line(tmp_path, capsys, tiny_parts):
    from csdiff.backbone.random_models import write_random_lora

    lora = write_random_lora(tmp_path / "style.safetensors", tiny_parts.unet)
    _images(tmp_path / "in", 1)
    variants = [
        {"name": "plain"},
        {
            "name": "styled",
            "loras": [{"path": str(lora), "scale": 0.8}],
            "controlnets": [{"model": "tiny-controlnet-canny"}],
        },
    ]
    args = [
        "extract",
        "--extractor.model",
        "tiny",
        "--extractor.img_size",
        "64",
        "--extractor.layers",
        '["up-level1-upsampler-out"]',
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
    ]
    before = os.umask(0o022)
    try:
        assert main([*args, "--extractor.variants", json.dumps(variants)]) == 0
    finally:
        os.umask(before)
    features = load_file(str(tmp_path / "out" / "img0.safetensors"))
    assert set(features) == {"plain/up-level1-upsampler-out", "styled/up-level1-upsampler-out"}
    assert not torch.equal(features["plain/up-level1-upsampler-out"], features["styled/up-level1-upsampler-out"])
    assert all(
        (p.stat().st_mode & 0o777) == 0o644 for p in (tmp_path / "out").iterdir()
    )  # the umask's, not mkstemp's 0600
    capsys.readouterr()
    typo = [{"name": "styled", "loras": [{"pth": str(lora)}]}]
    assert main([*args, "--extractor.variants", json.dumps(typo)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "extractor.variants" in lines[0] and "pth" in lines[0]


def test_a_failed_start_does_not_bind_the_feature_folder(tmp_path, capsys):
    """An extract that stopped before its first feature file (here: a truncated image) leaves
    a manifest; the corrected rerun, with other settings, is not refused because of it."""
    _images(tmp_path / "in", 1)
    image = next((tmp_path / "in").iterdir())
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) // 2])
    args = [
        "extract",
        "--extractor.model",
        "tiny",
        "--extractor.layers",
        '["up-level1-upsampler-out"]',
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
    ]
    assert main([*args, "--extractor.img_size", "64"]) == 1 and "truncated" in capsys.readouterr().err
    image.write_bytes(whole)
    assert main([*args, "--extractor.img_size", "128"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["extractor"]["img_size"] == 128


# --- 7. smaller ones ---


def test_outputs_follow_the_umask(tmp_path):
    from csdiff.io import save_text

    before = os.umask(0o027)
    try:
        assert save_text(tmp_path / "a.txt", "x").stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        assert save_text(tmp_path / "b.txt", "x").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(before)


def test_a_failed_write_names_the_file_and_leaves_nothing(tmp_path):
    """A full disk (here: a file-size limit, EFBIG) reports the file being written."""
    from csdiff.io import save_tensors

    target = tmp_path / "features" / "x.safetensors"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError, match="File too large") as info:
            save_tensors(target, {"x": torch.zeros(10_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert info.value.filename == str(target) and str(target) in str(info.value)
    assert not list(target.parent.iterdir())


@pytest.mark.parametrize("kind", ["file", "device"])
def test_extract_output_that_is_not_a_folder(tmp_path, capsys, kind):
    _images(tmp_path / "in", 1)
    output = tmp_path / "taken.txt" if kind == "file" else Path("/dev/full")
    if kind == "file":
        output.write_text("mine\n")
    code = main(["extract", "--extractor.img_size", "64", "--input", str(tmp_path / "in"), "--output", str(output)])
    assert code == 1 and f"output {output} exists and is not a folder" in last_error(capsys)[-1]


def test_ade20k_root_message_names_the_folder_to_pass(tmp_path):
    from csdiff.data import ADE20KDataModule
    from csdiff.data.reading import DataError

    (tmp_path / "ade" / "ADEChallengeData2016").mkdir(parents=True)
    with pytest.raises(DataError) as info:  # the parent given: its images/ is missing
        ADE20KDataModule(root=str(tmp_path / "ade")).find_samples("train")
    assert "the ADEChallengeData2016 folder is the root" in str(info.value) and "under " + str(tmp_path / "ade") in str(
        info.value
    )


def test_layers_refuses_an_img_size_the_model_cannot_take(capsys):
    assert main(["layers", "--img_size", "100"]) == 1
    assert "img_size=100 does not suit this model: it must be a positive multiple of 64" in last_error(capsys)[-1]


def test_no_arguments_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: csdiff <command>" in capsys.readouterr().err


def test_up_cross_needs_attention_in_its_up_levels():
    from diffusers import UNet2DConditionModel

    from csdiff.backbone.names import UnknownLayerError, resolve_layers

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    )
    assert resolve_layers(unet, ["up-level1-upsampler-out"]) == ["up-level1-upsampler-out"]
    with pytest.raises(UnknownLayerError, match=r"no attention in up-level1 \(UpBlock2D\); choose other layers"):
        resolve_layers(unet, ["up_cross"])
