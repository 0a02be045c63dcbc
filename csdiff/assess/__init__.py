"""Assessing features: the GATE content-shift score (``csdiff assess``) and linear probes."""

from csdiff.assess.gate_score import (
    bootstrap_mean_interval,
    contour_difference,
    gate_score,
    laplacian_norm,
    paired_bootstrap_difference,
    verdict,
)
from csdiff.assess.probe import linear_probe_miou, random_weight_copy, shapes_probe_data

__all__ = [
    "bootstrap_mean_interval",
    "contour_difference",
    "gate_score",
    "laplacian_norm",
    "linear_probe_miou",
    "paired_bootstrap_difference",
    "random_weight_copy",
    "shapes_probe_data",
    "verdict",
]
