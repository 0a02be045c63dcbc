"""Pure-torch trainable parts: gate fusion, segmentation heads, losses (no Lightning here)."""

from csdiff.models.blocks import ResidualConvBlock, residual_stack
from csdiff.models.gate import GatedFusion, GateOutput, WeightAssigner, diversity_loss, sparsity_loss
from csdiff.models.heads import FCNHead, UPerHead
from csdiff.models.losses import SegmentationLoss, lovasz_softmax

__all__ = [
    "FCNHead",
    "GateOutput",
    "GatedFusion",
    "ResidualConvBlock",
    "SegmentationLoss",
    "UPerHead",
    "WeightAssigner",
    "diversity_loss",
    "lovasz_softmax",
    "residual_stack",
    "sparsity_loss",
]
