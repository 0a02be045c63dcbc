"""Assessing features: linear probes (and, later, the GATE content-shift score)."""

from csdiff.assess.probe import linear_probe_miou, random_weight_copy, shapes_probe_data

__all__ = ["linear_probe_miou", "random_weight_copy", "shapes_probe_data"]
