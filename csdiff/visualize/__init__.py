"""Pictures for people: label overlays, keypoint matches, RGB conversions (callbacks and writers),
feature maps through a joint PCA basis (`csdiff visualize`)."""

from csdiff.visualize.matches import draw_matches
from csdiff.visualize.overlays import image_to_rgb, overlay
from csdiff.visualize.pca import PCABasis, cosine_distance, fit_pca

__all__ = ["PCABasis", "cosine_distance", "draw_matches", "fit_pca", "image_to_rgb", "overlay"]
