"""Pure-torch trainable parts: gate fusion, segmentation heads, losses (no Lightning here)."""

from csdiff.models.blocks import ResidualConvBlock, residual_stack
from csdiff.models.correspondence import CorrespondenceHead, info_nce, match_points, rescale_points, sample_features
from csdiff.models.gate import GatedFusion, GateOutput, WeightAssigner, diversity_loss, sparsity_loss
from csdiff.models.heads import FCNHead, UPerHead
from csdiff.models.losses import SegmentationLoss, lovasz_softmax

__all__ = [
    "CorrespondenceHead",
    "FCNHead",
    "GateOutput",
    "GatedFusion",
    "ResidualConvBlock",
    "SegmentationLoss",
    "UPerHead",
    "WeightAssigner",
    "diversity_loss",
    "info_nce",
    "lovasz_softmax",
    "match_points",
    "rescale_points",
    "residual_stack",
    "sample_features",
    "sparsity_loss",
]
