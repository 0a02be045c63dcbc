"""Pictures for people: label overlays and RGB conversions shared by callbacks and writers."""

from csdiff.visualize.overlays import image_to_rgb, overlay

__all__ = ["image_to_rgb", "overlay"]
