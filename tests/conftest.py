"""Shared fixtures: everything offline, on CPU, with few threads, on the packaged tiny model."""

from __future__ import annotations

import gc
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import yaml

torch.set_num_threads(1)  # small ops on 2 shared cores: one thread avoids oversubscription

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_parts():
    """The packaged tiny model's components, loaded once (read-only use)."""
    from csdiff.backbone.loading import load_sd_components

    return load_sd_components("tiny")


@pytest.fixture
def two_threads():
    """SD-size tests are dominated by large convolutions and matmuls: use both cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def free_after():
    """SD-size runs hold ~10 GB in reference cycles (trainer, module, callbacks), which the
    cyclic collector frees only when it next runs: collect now, so that the next test's model
    does not join this one's in memory (two would not fit a 24 GB machine)."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """For test_resume.py and test_reliability.py: the shipped quickstart config plus
    test_resume.ResumeProbe, and its dataset generated once (before two fits would race to write it)."""
    from csdiff.data import QuickstartDataModule

    work = tmp_path_factory.mktemp("resume")
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["trainer"]["callbacks"].append({"class_path": "test_resume.ResumeProbe"})
    (work / "quickstart.yaml").write_text(yaml.safe_dump(config))
    QuickstartDataModule(
        root=str(work / "data" / "ADEChallengeData2016"), num_train=8, num_val=2, size=64
    ).prepare_data()
    return work
