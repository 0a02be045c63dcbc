"""Resuming as a user does: the shipped configs, their own logger versioning and validation
interval, `csdiff fit --config X --ckpt_path last` as the README writes it.

Each fit of the quickstart runs in its own process, like a real one: one is SIGKILLed
mid-epoch, another gets Ctrl-C (SIGINT) mid-epoch; both resume and end with the weights of
an uninterrupted run. Lightning restores neither the global RNG state nor a plain sampler's
position, so this holds only because data order, augmentation, dropout and fresh noise are
keyed on (seed, epoch) and the sampler skips what a resumed epoch has already trained on.
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

from csdiff.cli import main

ROOT = Path(__file__).resolve().parents[1]
HANG_ENV = "CSDIFF_TEST_HANG_AT_STEP"  # "<global step>:<marker file>"; the fit goes on once <marker>.go exists
TRACE_ENV = "CSDIFF_TEST_TRACE"  # file that gets "<epoch> <global step>" at each fit start
EPOCHS, STEPS_PER_EPOCH = 5, 4  # the quickstart validates every 4th epoch: 5 is not a multiple of it
KILL_STEP = STEPS_PER_EPOCH + 2  # mid second epoch, after the first epoch's last.ckpt
RUN = Path("outputs") / "quickstart" / "version_0"  # the quickstart's own logger folder, first version
TIMEOUT_S = 600


class ResumeProbe(Callback):
    """Test-only, loaded by the fit subprocesses (the `work` fixture in conftest.py puts it in the
    config): records where each fit starts and, when asked, writes a marker at a global step and
    then waits there (to be killed, or released)."""

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
            deadline = time.monotonic() + TIMEOUT_S
            while not Path(marker + ".go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def fit_command(work: Path, *extra: str) -> list[str]:
    """`csdiff fit --config quickstart.yaml`, shrunk (64², 8 images, 4 steps per epoch), with
    dropout and fresh training noise, whose streams resuming must restore."""
    args = {
        "--config": str(work / "quickstart.yaml"),
        "--data.init_args.root": str(work / "data" / "ADEChallengeData2016"),
        "--data.init_args.num_train": "8",
        "--data.init_args.num_val": "2",
        "--data.init_args.size": "64",
        "--data.init_args.batch_size": "2",
        "--data.init_args.eval_batch_size": "2",
        "--model.init_args.backbone.img_size": "64",
        "--model.init_args.slide_crop": "64",
        "--model.init_args.slide_stride": "64",
        "--trainer.max_epochs": str(EPOCHS),
        "--trainer.enable_progress_bar": "false",
        "--model.init_args.train_noise": "fresh",
        "--model.init_args.dropout": "0.1",
    }
    return [sys.executable, "-m", "csdiff", "fit", *(x for kv in args.items() for x in kv), *extra]


def start(cmd: list[str], cwd: Path, name: str, session: bool = False, **env: str) -> tuple[subprocess.Popen, Path]:
    """Start ``cmd`` in ``cwd`` with its output in ``name``.log; ``session``: in a process group
    of its own, which a signal can reach whole (as `timeout` and SLURM send them)."""
    base = {k: v for k, v in os.environ.items() if k not in (HANG_ENV, TRACE_ENV)}
    pythonpath = os.pathsep.join(p for p in (str(Path(__file__).parent), base.get("PYTHONPATH")) if p)
    base.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=pythonpath, **env)
    cwd.mkdir(parents=True, exist_ok=True)
    log = cwd / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=base, stdout=out, stderr=subprocess.STDOUT, start_new_session=session)
    return proc, log


def finish(proc: subprocess.Popen, log: Path, code: int = 0) -> str:
    rc = proc.wait(timeout=TIMEOUT_S)
    text = log.read_text()
    assert rc == code, f"{log.name} exited with {rc}:\n{text[-4000:]}"
    return text


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(final: dict, reference: dict) -> None:
    assert (final["epoch"], final["global_step"]) == (reference["epoch"], reference["global_step"])
    assert final["state_dict"].keys() == reference["state_dict"].keys()
    differ = [k for k, v in reference["state_dict"].items() if not torch.equal(v, final["state_dict"][k])]
    assert not differ, (
        f"{len(differ)} of {len(reference['state_dict'])} tensors differ after resuming, e.g. {differ[:3]}"
    )


def interrupt_and_resume(
    work: Path, name: str, sig: signal.Signals, *extra: str, group: bool = False
) -> tuple[dict, dict, str, str]:
    """Run an uninterrupted fit beside one stopped by ``sig`` at KILL_STEP, then resume the
    latter with `--ckpt_path last`; returns (reference last.ckpt, resumed last.ckpt,
    the interrupted run's log, the resume trace). ``extra`` options go to every fit; ``group``
    sends the signal to the fit's whole process group (its DataLoader workers too)."""
    whole_dir, cut_dir = work / name / "whole", work / name / "cut"
    marker, trace = work / name / "hang.marker", work / name / "trace.txt"
    procs: list[subprocess.Popen] = []
    try:
        whole = start(fit_command(work, *extra), whole_dir, "whole")
        cut, cut_log = start(
            fit_command(work, *extra), cut_dir, "cut", session=group, **{HANG_ENV: f"{KILL_STEP}:{marker}"}
        )
        procs += [whole[0], cut]
        deadline = time.monotonic() + TIMEOUT_S
        while not marker.exists():
            assert cut.poll() is None, f"the run to interrupt exited ({cut.returncode}):\n{cut_log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the run to interrupt never reached the kill step"
            time.sleep(0.2)
        assert marker.read_text() == str(KILL_STEP - STEPS_PER_EPOCH)  # mid-epoch, not at its start
        if group:
            os.killpg(cut.pid, sig)
        else:
            cut.send_signal(sig)
        if sig == signal.SIGKILL:
            assert cut.wait(timeout=60) == -signal.SIGKILL
            cut_text = ""
        else:
            Path(f"{marker}.go").touch()
            cut_text = finish(cut, cut_log, code=128 + sig)  # the shell's code for a death by sig: 130, 143
        resumed = start(fit_command(work, *extra, "--ckpt_path", "last"), cut_dir, "resumed", **{TRACE_ENV: str(trace)})
        procs.append(resumed[0])
        finish(*resumed)
        finish(*whole)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sorted(p.name for p in (cut_dir / RUN).parent.iterdir()) == ["version_0"]  # resumed in its own folder
    return (
        load(whole_dir / RUN / "checkpoints" / "last.ckpt"),
        load(cut_dir / RUN / "checkpoints" / "last.ckpt"),
        cut_text,
        trace.read_text(),
    )


def test_sigkilled_fit_resumes_to_the_uninterrupted_weights(work):
    """SIGKILL mid-epoch: last.ckpt holds the last completed epoch (though validation runs only
    every 4th), and the resumed fit ends bit-identical, dropout and fresh noise included."""
    reference, final, _, trace = interrupt_and_resume(work, "kill", signal.SIGKILL)
    assert trace.split() == ["1", str(STEPS_PER_EPOCH)]  # it resumed at the second epoch
    # the final epoch is saved although EPOCHS is not a multiple of the validation interval
    assert (reference["epoch"], reference["global_step"]) == (EPOCHS - 1, EPOCHS * STEPS_PER_EPOCH)
    assert_same_weights(final, reference)


def test_ctrl_c_saves_the_step_reached_and_resumes_mid_epoch(work):
    """SIGINT mid-epoch: the step in progress finishes, last.ckpt holds it, exit code 130; the
    resumed fit continues that epoch with the data it had not seen and ends bit-identical,
    dropout and fresh noise included (torch is reseeded per step)."""
    reference, final, log, trace = interrupt_and_resume(work, "sigint", signal.SIGINT)
    assert f"interrupted at epoch 1, step {KILL_STEP + 1}" in log and "--ckpt_path last" in log
    assert trace.split() == ["1", str(KILL_STEP + 1)]
    assert_same_weights(final, reference)


def test_paper_config_keeps_best_two_and_last_and_resumes(tmp_path, capsys):
    """seg_ade20k_public with the tiny backbone: best-2 by val/mIoU plus last.ckpt, which is
    written every N steps and at the end of the fit; `--ckpt_path last` continues the run."""
    from test_configs import _substitute_tiny

    config = _substitute_tiny(yaml.safe_load((ROOT / "configs" / "seg_ade20k_public.yaml").read_text()), tmp_path)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "outputs")
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(config))
    fit = ["fit", "--config", str(path), "--trainer.val_check_interval", "1", "--model.init_args.head_channels", "16"]
    assert main([*fit, "--trainer.max_steps", "3"]) == 0  # last.ckpt every 2 steps; 3 is not a multiple
    run = tmp_path / "outputs" / "version_0" / "checkpoints"
    assert load(run / "last.ckpt")["global_step"] == 3
    best = sorted(p.name for p in run.glob("best-*.ckpt"))
    assert len(best) == 2 and all("mIoU=" in name for name in best), best
    assert main([*fit, "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 0
    assert load(run / "last.ckpt")["global_step"] == 4
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["version_0"]
