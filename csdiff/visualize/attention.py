"""Where attention lands: heat maps of a prompt's words (cross-attention, from ``up_cross``)
and of chosen image points (self-attention, from a ``…-self-map`` layer).

``up_cross`` folds a long prompt's 75-token windows onto 77 channels per level (channel k =
position k of every window, see ``csdiff.backbone.capture.fold_prompt_windows``), so a word
is found by its token positions in the windowed prompt, and a word split into sub-word
tokens is the sum of their channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from csdiff.backbone.names import UP_CROSS, enumerate_activations, resolve_layers, up_cross_problem
from csdiff.backbone.variants import Variant
from csdiff.visualize.overlays import image_to_rgb


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids


def word_channels(tokenizer, prompt: str, word: str) -> list[int]:
    """The folded cross-attention channels of every occurrence of ``word`` in ``prompt``.

    A match must start at a word boundary (CLIP's byte-pair tokens end a word with ``</w>``), so
    "a" is not found inside "zebra"'s last token. Raises a ValueError if the word is absent.
    """
    word_ids = _tokens(tokenizer, word.strip())
    ids = _tokens(tokenizer, prompt)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    body = tokenizer.model_max_length - 2  # tokens per window, between BOS and EOS
    n = len(word_ids)
    starts = [
        j
        for j in range(len(ids) - n + 1)
        if word_ids and ids[j : j + n] == word_ids and (j == 0 or pieces[j - 1].endswith("</w>"))
    ]
    if not starts:
        raise ValueError(f"the word {word!r} is not in the prompt {prompt!r}; choose a word of that prompt")
    return [1 + (j + i) % body for j in starts for i in range(n)]  # +1: each window opens with BOS


def word_map(up_cross: torch.Tensor, channels: list[int], window: int = 77) -> torch.Tensor:
    """(B, levels·window, H, W) ``up_cross`` → (B, H, W): the word's channels summed, levels averaged."""
    b, c, h, w = up_cross.shape
    if c % window:
        raise ValueError(f"up_cross has {c} channels, not a whole number of {window}-token windows")
    levels = up_cross.float().view(b, c // window, window, h, w)
    return levels[:, :, channels].sum(2).mean(1)


def query_map(self_map: torch.Tensor, point: tuple[float, float]) -> torch.Tensor:
    """(B, H·W, H, W) self-attention probabilities (keys × query grid) → (B, H, W): where the
    query at ``point`` (x, y as fractions of the image's width and height) attends."""
    x, y = point
    if not (0 <= x <= 1 and 0 <= y <= 1):
        raise ValueError(f"a query point is (x, y) in fractions of the image, each in [0, 1]; got {list(point)}")
    b, n_keys, h, w = self_map.shape
    if n_keys != h * w:
        raise ValueError(f"not a self-attention map: {n_keys} keys for a {h}x{w} query grid")
    return self_map[:, :, min(int(y * h), h - 1), min(int(x * w), w - 1)].float().view(b, h, w)


def mark(picture: np.ndarray, point: tuple[float, float]) -> np.ndarray:
    """The query point drawn as a white ring with a black rim, so it shows on any colour."""
    h, w = picture.shape[:2]
    centre = (min(int(point[0] * w), w - 1), min(int(point[1] * h), h - 1))
    out = picture.copy()
    cv2.circle(out, centre, 4, (0, 0, 0), 2, cv2.LINE_AA)
    cv2.circle(out, centre, 3, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def heat_overlay(image: torch.Tensor, weights: torch.Tensor, size: int, alpha: float = 0.55) -> np.ndarray:
    """RGB picture of ``image`` (3, H, W) in [-1, 1] under a JET heat map of ``weights`` (h, w),
    stretched between its own minimum (blue) and maximum (red): a word's attention is often
    nearly uniform, and only the contrast shows where it lands. Both at ``size``²."""
    weights = weights.float()
    low, high = weights.min(), weights.max()
    heat = ((weights - low) / (high - low).clamp_min(1e-12)).mul(255).round().to(torch.uint8).cpu().numpy()
    heat = cv2.resize(heat, (size, size), interpolation=cv2.INTER_NEAREST)
    colours = cv2.applyColorMap(heat, cv2.COLORMAP_JET)[..., ::-1]
    picture = image_to_rgb(image, (size, size))
    return (picture * (1 - alpha) + colours * alpha).round().astype(np.uint8)


@dataclass(frozen=True)
class AttentionPlan:
    """What each image's attention picture shows: words and query points of one variant."""

    variant: str
    words: dict[str, list[int]]  # word → its folded cross-attention channels
    points: list[tuple[float, float]]
    self_layer: str | None
    window: int

    @property
    def layers(self) -> list[str]:
        """The layers the variant must capture for these maps."""
        return ([UP_CROSS] if self.words else []) + ([self.self_layer] if self.points else [])

    def pictures(
        self, image: torch.Tensor, features: dict[str, torch.Tensor], cell: int
    ) -> list[tuple[str, np.ndarray]]:
        """(title, RGB) cells: the input, each word's heat map, each point's (marked) heat map."""
        out = [(f"input ({self.variant})", image_to_rgb(image, (cell, cell)))]
        for word, channels in self.words.items():
            out.append(
                (repr(word), heat_overlay(image, word_map(features[UP_CROSS][None], channels, self.window)[0], cell))
            )
        for point in self.points:
            heat = heat_overlay(image, query_map(features[self.self_layer][None], point)[0], cell)
            out.append((f"point ({point[0]:.2f}, {point[1]:.2f})", mark(heat, point)))
        return out


def finest_self_map(unet: nn.Module) -> str:
    """The default self-attention layer for query points: the last (finest) one of the up-levels."""
    names = [n for n in enumerate_activations(unet) if n.startswith("up-level") and n.endswith("-self-map")]
    if not names:
        raise ValueError(
            "this UNet has no self-attention in its up-levels: name a `…-self-map` layer (see `csdiff layers`)"
        )
    return names[-1]


def plan_attention(
    unet: nn.Module,
    tokenizer,
    variants: Sequence[Variant],
    words: Sequence[str],
    points: Sequence[Sequence[float]],
    variant: str | None = None,
    self_layer: str | None = None,
) -> AttentionPlan | None:
    """Check the request against the model and the variant's prompt before anything is computed
    (None when neither words nor points are asked for)."""
    if not words and not points:
        return None
    if words and up_cross_problem(unet) is not None:  # word maps read up_cross: say why there is none
        raise ValueError(f"--words: {up_cross_problem(unet)}")
    by_name = {v.name: v for v in variants}
    name = variant or variants[0].name
    if name not in by_name:
        raise ValueError(f"attention variant {name!r} is not a variant of the config ({', '.join(by_name)})")
    pairs = [tuple(float(v) for v in p) for p in points]
    for pair in pairs:
        if len(pair) != 2 or not all(0 <= v <= 1 for v in pair):
            raise ValueError(f"a query point is (x, y) in fractions of the image, each in [0, 1]; got {list(pair)}")
    layer = None
    if pairs:
        layer = resolve_layers(unet, [self_layer])[0] if self_layer else finest_self_map(unet)
        if not layer.endswith("-self-map"):
            raise ValueError(f"query points need a self-attention map layer (`…-self-map`), not {layer!r}")
    channels = {word: word_channels(tokenizer, by_name[name].prompt, word) for word in words}
    return AttentionPlan(name, channels, pairs, layer, tokenizer.model_max_length)
