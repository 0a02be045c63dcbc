"""Shared fixtures: everything offline, on CPU, with few threads, on the packaged tiny model."""

from __future__ import annotations

import gc
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)  # small ops on 2 shared cores: one thread avoids oversubscription


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
