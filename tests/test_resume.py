"""Resuming a killed fit with ``--ckpt_path last`` ends with the weights of an uninterrupted run.

Lightning restores neither the global RNG state nor a plain sampler's position, so this holds
only because data order, augmentation, dropout and fresh noise are all keyed on (seed, epoch).
Each fit runs in its own process, like a real one; the interrupted one is SIGKILLed mid-epoch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
HANG_ENV = "CSDIFF_TEST_HANG_AT_STEP"  # "<global step>:<marker file>"
TRACE_ENV = "CSDIFF_TEST_TRACE"  # file that gets "<epoch> <global step>" at each fit start
EPOCHS, STEPS_PER_EPOCH = 3, 4
KILL_STEP = STEPS_PER_EPOCH + 2  # mid second epoch, after the first epoch's last.ckpt
TIMEOUT_S = 600


class ResumeProbe(Callback):
    """Test-only, loaded by the fit subprocesses: records where each fit starts and, when asked,
    writes a marker at a global step and then waits there to be killed."""

    def on_train_start(self, trainer, pl_module) -> None:
        if TRACE_ENV in os.environ:
            with open(os.environ[TRACE_ENV], "a") as f:
                f.write(f"{trainer.current_epoch} {trainer.global_step}\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if HANG_ENV not in os.environ:
            return
        step, marker = os.environ[HANG_ENV].split(":", 1)
        if trainer.global_step == int(step):
            Path(marker).write_text(str(batch_idx))
            time.sleep(TIMEOUT_S)


def resume_config(work: Path) -> Path:
    """The quickstart config with its outputs under ``work`` and the probe callback added.

    Its checkpoint callback monitors nothing: Lightning (2.6) refreshes last.ckpt only when
    the callback saves a checkpoint, i.e. with a monitor only when the metric improves.
    ``save_last`` is left unset, so the CLI's default (True) is what writes last.ckpt.
    """
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    callbacks = [c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith("PredictionWriter")]
    for callback in callbacks:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"] = {"filename": "{epoch}-{step}"}
    callbacks.append({"class_path": f"{Path(__file__).stem}.ResumeProbe"})
    config["trainer"]["callbacks"] = callbacks
    path = work / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit_command(work: Path, config: Path, save_dir: Path, *extra: str) -> list[str]:
    args = {
        "--config": str(config),
        "--data.init_args.root": str(work / "data" / "ADEChallengeData2016"),
        "--data.init_args.num_train": "8",
        "--data.init_args.num_val": "2",
        "--data.init_args.size": "64",
        "--data.init_args.batch_size": "2",
        "--data.init_args.eval_batch_size": "2",
        "--model.init_args.backbone.img_size": "64",
        "--model.init_args.slide_crop": "64",
        "--model.init_args.slide_stride": "64",
        "--model.init_args.train_noise": "fresh",
        "--model.init_args.dropout": "0.1",
        "--trainer.max_epochs": str(EPOCHS),
        "--trainer.check_val_every_n_epoch": "1",
        "--trainer.logger.init_args.save_dir": str(save_dir),
        "--trainer.logger.init_args.version": "run",  # fixed, so `last` is found on resume
        "--trainer.default_root_dir": str(save_dir),
        "--trainer.enable_progress_bar": "false",
        "--trainer.log_every_n_steps": "1",
    }
    return [sys.executable, "-m", "csdiff", "fit", *(x for kv in args.items() for x in kv), *extra]


def start(cmd: list[str], work: Path, name: str, **env: str) -> tuple[subprocess.Popen, Path]:
    base = {k: v for k, v in os.environ.items() if k not in (HANG_ENV, TRACE_ENV)}
    pythonpath = os.pathsep.join(p for p in (str(Path(__file__).parent), base.get("PYTHONPATH")) if p)
    base.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=pythonpath, **env)
    log = work / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=base, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def finish(proc: subprocess.Popen, log: Path) -> None:
    rc = proc.wait(timeout=TIMEOUT_S)
    assert rc == 0, f"{log.name} exited with {rc}:\n{log.read_text()[-4000:]}"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_killed_fit_resumes_to_the_uninterrupted_weights(tmp_path):
    from csdiff.data import QuickstartDataModule

    work = tmp_path
    config = resume_config(work)
    # generate the shared dataset once, before two fits would race to write it
    data = QuickstartDataModule(root=str(work / "data" / "ADEChallengeData2016"), num_train=8, num_val=2, size=64)
    data.prepare_data()
    whole_dir, cut_dir = work / "whole", work / "cut"
    marker, trace = work / "hang.marker", work / "trace.txt"
    last = cut_dir / "run" / "checkpoints" / "last.ckpt"
    procs: list[subprocess.Popen] = []
    try:
        # the reference run and the run to interrupt, side by side (one thread each)
        whole = start(fit_command(work, config, whole_dir), work, "whole")
        cut, cut_log = start(fit_command(work, config, cut_dir), work, "cut", **{HANG_ENV: f"{KILL_STEP}:{marker}"})
        procs += [whole[0], cut]
        deadline = time.monotonic() + TIMEOUT_S
        while not marker.exists():
            assert cut.poll() is None, f"the run to interrupt exited ({cut.returncode}):\n{cut_log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the run to interrupt never reached the kill step"
            time.sleep(0.2)
        cut.send_signal(signal.SIGKILL)
        assert cut.wait(timeout=60) == -signal.SIGKILL
        assert marker.read_text() == str(KILL_STEP - STEPS_PER_EPOCH)  # killed mid-epoch, not at its start
        saved = load(last)
        assert (saved["epoch"], saved["global_step"]) == (0, STEPS_PER_EPOCH)  # the end of the first epoch

        resume = fit_command(work, config, cut_dir, "--ckpt_path", "last")
        resumed = start(resume, work, "resumed", **{TRACE_ENV: str(trace)})
        procs.append(resumed[0])
        finish(*resumed)
        finish(*whole)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert trace.read_text().split() == ["1", str(STEPS_PER_EPOCH)]  # it did resume, at the second epoch

    reference = load(whole_dir / "run" / "checkpoints" / "last.ckpt")
    final = load(last)
    end = (EPOCHS - 1, EPOCHS * STEPS_PER_EPOCH)
    assert (final["epoch"], final["global_step"]) == (reference["epoch"], reference["global_step"]) == end
    assert final["state_dict"].keys() == reference["state_dict"].keys()
    differ = [k for k, v in reference["state_dict"].items() if not torch.equal(v, final["state_dict"][k])]
    total = len(reference["state_dict"])
    assert not differ, f"{len(differ)} of {total} tensors differ after resuming, e.g. {differ[:3]}"
