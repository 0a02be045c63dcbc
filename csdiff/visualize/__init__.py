"""Pictures for people: label overlays, keypoint matches, RGB conversions (callbacks and writers)."""

from csdiff.visualize.matches import draw_matches
from csdiff.visualize.overlays import image_to_rgb, overlay

__all__ = ["draw_matches", "image_to_rgb", "overlay"]
