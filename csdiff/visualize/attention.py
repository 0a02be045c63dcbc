"""Where attention lands: heat maps of a prompt's words (cross-attention, from ``up_cross``,
or ``cross_maps`` on diffusion transformers) and of chosen image points (self-attention, from a
``…-self-map`` layer).

``up_cross`` folds a long prompt's 75-token windows onto 77 channels per level (channel k =
position k of every window, see ``csdiff.backbone.capture.fold_prompt_windows``), so a word
is found by its token positions in the windowed prompt, and a word split into sub-word
tokens is the sum of their channels. ``cross_maps`` has one channel per text token (T5's
prompt; SD3: CLIP's 77, then T5's), so a word is found in each encoder's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from csdiff.backbone.families import family_of
from csdiff.backbone.names import (
    CROSS_MAPS,
    UP_CROSS,
    cross_maps_problem,
    enumerate_activations,
    resolve_layers,
    up_cross_problem,
)
from csdiff.backbone.variants import Variant
from csdiff.visualize.overlays import image_to_rgb


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids


def _word_starts(tokenizer, prompt: str, word: str) -> tuple[list[int], int]:
    """Token positions where ``word`` starts in ``prompt`` (special tokens not counted), and its length.

    A match must start at a word boundary: CLIP's byte-pair tokens end a word with ``</w>``, so
    "a" is not found inside "zebra"'s last token; T5's SentencePiece pieces open a word with
    ``▁``, which the word tokenized alone carries too. Raises a ValueError if the word is absent.
    """
    word_ids = _tokens(tokenizer, word.strip())
    ids = _tokens(tokenizer, prompt)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    n = len(word_ids)
    starts = [
        j
        for j in range(len(ids) - n + 1)
        if word_ids
        and ids[j : j + n] == word_ids
        and (j == 0 or pieces[j - 1].endswith("</w>") or pieces[j].startswith("\u2581"))
    ]
    if not starts:
        raise ValueError(f"the word {word!r} is not in the prompt {prompt!r}; choose a word of that prompt")
    return starts, n


def word_channels(tokenizer, prompt: str, word: str) -> list[int]:
    """The folded cross-attention channels of every occurrence of ``word`` in a CLIP-encoded ``prompt``."""
    starts, n = _word_starts(tokenizer, prompt, word)
    body = tokenizer.model_max_length - 2  # tokens per window, between BOS and EOS
    return [1 + (j + i) % body for j in starts for i in range(n)]  # +1: each window opens with BOS


def t5_word_channels(tokenizer, prompt: str, word: str, offset: int = 0) -> list[int]:
    """The channels of every occurrence of ``word`` in a T5-encoded ``prompt`` (no BOS; the prompt
    is cut at ``model_max_length`` tokens, its EOS included), shifted by ``offset``."""
    starts, n = _word_starts(tokenizer, prompt, word)
    kept = [offset + j + i for j in starts for i in range(n) if j + i < tokenizer.model_max_length - 1]
    if not kept:
        raise ValueError(
            f"the word {word!r} lies past the {tokenizer.model_max_length} tokens the model reads of {prompt!r}"
        )
    return kept


def dit_word_channels(family: str, tokenizers: Sequence, prompt: str, word: str) -> list[int]:
    """A word's ``cross_maps`` channels: T5's token positions (PixArt, FLUX); for SD3, CLIP-L's
    77 positions (one window: SD3 cuts CLIP at 77, BOS first) then T5's."""
    if family != "sd3":
        return t5_word_channels(tokenizers[-1], prompt, word)
    clip, t5 = tokenizers[0], tokenizers[-1]
    starts, n = _word_starts(clip, prompt, word)
    in_clip = [1 + j + i for j in starts for i in range(n) if j + i < clip.model_max_length - 2]
    try:
        in_t5 = t5_word_channels(t5, prompt, word, offset=clip.model_max_length)
    except ValueError:  # past T5's tokens too: the message says so
        if not in_clip:
            raise
        in_t5 = []
    return in_clip + in_t5


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
    words_layer: str = UP_CROSS  # cross_maps on diffusion transformers

    @property
    def layers(self) -> list[str]:
        """The layers the variant must capture for these maps."""
        return ([self.words_layer] if self.words else []) + ([self.self_layer] if self.points else [])

    def pictures(
        self, image: torch.Tensor, features: dict[str, torch.Tensor], cell: int
    ) -> list[tuple[str, np.ndarray]]:
        """(title, RGB) cells: the input, each word's heat map, each point's (marked) heat map."""
        out = [(f"input ({self.variant})", image_to_rgb(image, (cell, cell)))]
        for word, channels in self.words.items():
            out.append(
                (
                    repr(word),
                    heat_overlay(image, word_map(features[self.words_layer][None], channels, self.window)[0], cell),
                )
            )
        for point in self.points:
            heat = heat_overlay(image, query_map(features[self.self_layer][None], point)[0], cell)
            out.append((f"point ({point[0]:.2f}, {point[1]:.2f})", mark(heat, point)))
        return out


def finest_self_map(unet: nn.Module) -> str:
    """The default self-attention layer for query points: the last (finest) one of the up-levels;
    on a diffusion transformer, that of the deepest block ``cross_maps`` reads."""
    family = family_of(unet)
    if family.grammar == "dit" and family.cross_map_blocks:
        return f"vit-block{min(family.cross_map_blocks[-1], len(unet.transformer_blocks) - 1)}-self-map"
    names = [n for n in enumerate_activations(unet) if n.startswith("up-level") and n.endswith("-self-map")]
    if not names:
        raise ValueError(
            "this UNet has no self-attention in its up-levels: name a `…-self-map` layer (see `csdiff layers`)"
        )
    return names[-1]


def plan_attention(
    unet: nn.Module,
    tokenizers: Sequence,
    variants: Sequence[Variant],
    words: Sequence[str],
    points: Sequence[Sequence[float]],
    variant: str | None = None,
    self_layer: str | None = None,
) -> AttentionPlan | None:
    """Check the request against the model and the variant's prompt before anything is computed
    (None when neither words nor points are asked for). ``tokenizers``: the model's, in order."""
    if not words and not points:
        return None
    family = family_of(unet)
    words_layer = CROSS_MAPS if family.grammar == "dit" else UP_CROSS
    problem = cross_maps_problem(unet) if words_layer == CROSS_MAPS else up_cross_problem(unet)
    if words and problem is not None:  # word maps read up_cross / cross_maps: say why there is none
        raise ValueError(f"--words: {problem}")
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
    prompt = by_name[name].prompt
    if words_layer == CROSS_MAPS:
        channels = {word: dit_word_channels(family.name, tokenizers, prompt, word) for word in words}
    else:
        channels = {word: word_channels(tokenizers[0], prompt, word) for word in words}
    return AttentionPlan(name, channels, pairs, layer, family.prompt_window(tokenizers), words_layer)
