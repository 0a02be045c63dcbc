"""DDP on CPU through the real `csdiff` command: 2 processes (gloo) give the single-process metrics.

Each rank scores its own unpadded shard of the evaluation split (an odd number of images
here, so the ranks get 3 and 2), and torchmetrics sums the confusion matrices at
``compute()``. The metrics are therefore exactly the single-process ones; each image is
predicted on its own (slide inference per image), so the evaluation batch size does not
change them either. Every command runs as a subprocess (`ddp`, not `ddp_spawn`) with one
thread per process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Callback

from csdiff.backbone.random_models import write_random_lora

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("mIoU", "aAcc", "mAcc")
DDP = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
# Tolerance at other evaluation batch sizes: none. Measured difference at batch size 2: 0.0.
BATCH_SIZE_TOLERANCE = 0.0
PROBE_ENV = "CSDIFF_TEST_FROZEN_PROBE"  # file that gets "<rank> <global step>" after each checked step


class FrozenBackboneProbe(Callback):
    """Test-only, loaded by the DDP fit: after every step, no backbone parameter (LoRA adapters
    included, which peft makes trainable whenever it switches them) requires a gradient or is
    in the optimizer."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        backbone = {id(p) for p in pl_module.extractor.parameters()}
        trainable = [n for n, p in pl_module.extractor.named_parameters() if p.requires_grad]
        optimized = [
            p for opt in trainer.optimizers for group in opt.param_groups for p in group["params"] if id(p) in backbone
        ]
        if trainable or optimized:
            raise AssertionError(f"backbone parameters trainable {trainable[:3]} or optimized ({len(optimized)})")
        with open(os.environ[PROBE_ENV], "a") as f:
            f.write(f"{trainer.global_rank} {trainer.global_step}\n")


def test_train_shards_are_disjoint_equal_and_keep_the_single_process_order():
    from torch.utils.data import DistributedSampler

    from csdiff.data.samplers import EpochSampler
    from csdiff.data.segmentation import SegmentationDataset
    from csdiff.data.transforms import EvalTransform

    dataset = SegmentationDataset([("a", None)] * 7, 3, EvalTransform())
    single = EpochSampler(dataset, seed=3)
    single.set_epoch(2)
    order = list(single)
    assert isinstance(single, DistributedSampler)  # so Lightning does not wrap it again
    for world in (2, 3):
        shards = []
        for rank in range(world):
            sampler = EpochSampler(dataset, seed=3, num_replicas=world, rank=rank)
            sampler.set_epoch(2)
            shards.append(list(sampler))
            assert len(sampler) == len(shards[-1]) == -(-7 // world)  # equal step counts
        interleaved = [shard[i] for i in range(len(shards[0])) for shard in shards]
        assert interleaved[:7] == order  # rank r holds positions r, r+W, ... of the one permutation
        assert interleaved[7:] == order[: len(interleaved) - 7]  # padded with the head


def test_eval_shards_cover_every_sample_once_without_padding():
    from torch.utils.data import DistributedSampler

    from csdiff.data.samplers import ShardedEvalSampler

    dataset = list(range(5))
    shards = [list(ShardedEvalSampler(dataset, num_replicas=2, rank=r)) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    assert [len(ShardedEvalSampler(dataset, 2, r)) for r in range(2)] == [3, 2]
    assert isinstance(ShardedEvalSampler(dataset, 2, 0), DistributedSampler)
    assert list(ShardedEvalSampler(dataset[:1], num_replicas=2, rank=1)) == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def csdiff(work: Path, verb: str, *args: str) -> None:
    """Run `python -m csdiff VERB ARGS` in ``work``; fail with its output if it fails."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        CSDIFF_DEBUG="1",
        TOKENIZERS_PARALLELISM="false",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p),
        **{PROBE_ENV: str(work / "frozen.txt")},
    )
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "csdiff", verb, *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"csdiff {verb} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


def quick_args(work: Path, run: str, eval_batch_size: int = 1) -> list[str]:
    """The shipped quickstart shrunk: 64² images, 8 train / 5 val, logs under ``work/<run>``;
    a third variant with a LoRA and the canny ControlNet, and the frozen-backbone probe."""
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("SegmentationPredictionWriter"):
            callback["init_args"]["output_dir"] = str(work / "predictions")
    config["trainer"]["callbacks"].append({"class_path": f"{Path(__file__).stem}.FrozenBackboneProbe"})
    variants = config["model"]["init_args"]["variants"]
    variants.append({**variants[1], "name": "lora_canny", "loras": [{"path": str(work / "lora.safetensors")}]})
    path = work / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config))
    args = {
        "--config": str(path),
        "--data.init_args.root": str(work / "data" / "ADEChallengeData2016"),
        "--data.init_args.num_train": "8",
        "--data.init_args.num_val": "5",  # odd: the ranks get 3 and 2 images
        "--data.init_args.size": "64",
        "--data.init_args.batch_size": "2",  # 2 steps per rank: DDP must reduce gradients twice
        "--data.init_args.eval_batch_size": str(eval_batch_size),
        "--model.init_args.backbone.img_size": "64",
        "--model.init_args.slide_crop": "64",
        "--model.init_args.slide_stride": "48",
        "--trainer.logger.init_args.save_dir": str(work / run),
        "--trainer.default_root_dir": str(work),
        "--trainer.enable_progress_bar": "false",
        "--trainer.enable_model_summary": "false",
        "--trainer.log_every_n_steps": "1",
    }
    return [x for kv in args.items() for x in kv]


def scalars(log_root: Path) -> dict[str, float]:
    """Last value of every scalar in the TensorBoard event files under ``log_root``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, float] = {}
    for events in sorted(log_root.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values[tag] = acc.Scalars(tag)[-1].value
    return values


def scored(work: Path, run: str, *args: str, eval_batch_size: int = 1) -> dict[str, float]:
    csdiff(work, "test", *quick_args(work, run, eval_batch_size), *args)
    values = scalars(work / run)
    return {k: values[f"test/{k}"] for k in METRICS}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One DDP fit (2 processes, 1 epoch); returns (work dir, last checkpoint, its val metrics)."""
    from csdiff.backbone.loading import load_sd_components

    work = tmp_path_factory.mktemp("ddp")
    write_random_lora(work / "lora.safetensors", load_sd_components("tiny").unet)
    csdiff(
        work,
        "fit",
        *quick_args(work, "fit", eval_batch_size=2),
        *DDP,
        "--trainer.max_epochs",
        "1",
        "--trainer.check_val_every_n_epoch",
        "1",
    )
    (ckpt,) = (work / "fit").rglob("last.ckpt")
    checked = sorted((work / "frozen.txt").read_text().split("\n")[:-1])
    assert checked == ["0 1", "0 2", "1 1", "1 2"]  # both ranks, every step
    values = scalars(work / "fit")
    return work, ckpt, {k: values[f"val/{k}"] for k in METRICS}


@pytest.fixture(scope="module")
def single(fitted):
    """Single-process `csdiff test` of the DDP-trained checkpoint (the reference)."""
    work, ckpt, _ = fitted
    return scored(work, "test-single", "--ckpt_path", str(ckpt))


def test_ddp_test_equals_single_process(fitted, single):
    work, ckpt, _ = fitted
    ddp = scored(work, "test-ddp", "--ckpt_path", str(ckpt), *DDP)
    assert ddp == single
    table = next((work / "test-ddp").rglob("test_per_class_iou.txt"))  # rank 0 wrote it (no hang)
    assert "circle" in table.read_text()


def test_ddp_test_at_eval_batch_size_2(fitted, single):
    work, ckpt, _ = fitted
    ddp = scored(work, "test-ddp-bs2", "--ckpt_path", str(ckpt), *DDP, eval_batch_size=2)
    for key in METRICS:
        assert abs(ddp[key] - single[key]) <= BATCH_SIZE_TOLERANCE, (key, ddp[key], single[key])


def test_validation_inside_ddp_fit_equals_single_process_test(fitted, single):
    _, _, val = fitted
    assert val == single  # the val split is the test split; last.ckpt holds the validated weights
