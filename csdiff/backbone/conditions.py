"""ControlNet condition maps computed from the input images."""

from __future__ import annotations

import cv2
import numpy as np
import torch


def canny_condition(images: torch.Tensor, low: int = 100, high: int = 200) -> torch.Tensor:
    """Canny edges of images in [-1, 1] (B,3,H,W) → (B,3,H,W) in {0, 1}, as ControlNet-canny expects.

    Runs OpenCV's ``Canny`` on the uint8 RGB image at the size the backbone sees.
    """
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    edges = np.stack([cv2.Canny(np.ascontiguousarray(img), low, high) for img in arr])
    cond = torch.from_numpy(edges).to(images.device, torch.float32).div_(255.0)
    return cond.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
