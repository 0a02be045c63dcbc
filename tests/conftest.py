"""Shared fixtures: everything offline, on CPU, with few threads, on the packaged tiny model."""

from __future__ import annotations

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
