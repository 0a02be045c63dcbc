"""Per-pixel diffusion features for the label-scarce task, stored small and upsampled on demand.

The research code upsampled every feature map to 256² and held all pixels as float32
(~250 GB for Horse-21). Here each map stays at its native size in fp16 (1280×16² is 640 KB
instead of 335 MB at 256² float32), and a pixel's upsampled feature is computed when it is
asked for: bilinear interpolation with ``align_corners=False`` is a fixed blend of the four
nearest native cells, so the 256² map never needs to exist.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from csdiff.data.reading import DataError


def bilinear_taps(in_size: int, out_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each output index along one axis: the two source indices and their weights, as
    ``F.interpolate(..., mode="bilinear", align_corners=False)`` computes them (float32).

    Source coordinate ``(o + 0.5) * in/out - 0.5``, clamped at 0 below; the upper neighbour is
    clamped to the last cell, so border pixels repeat the edge value.
    """
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    low = src.long()
    high = low + (low < in_size - 1).long()
    w_high = src - low.float()
    return low, high, 1.0 - w_high, w_high


class LazyFeatureFile(Mapping[str, Tensor]):
    """One image's features file, read one tensor at a time (memory-mapped by safetensors)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with self._open() as handle:
            self._keys = list(handle.keys())

    def _open(self):
        try:
            return safe_open(self.path, framework="pt")
        except (SafetensorError, OSError) as err:
            raise DataError(
                f"cannot read features file {self.path} ({err}); delete it so that it is extracted again"
            ) from err

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with self._open() as handle:
            return handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _layers_of(keys: Sequence[str], source: str) -> list[str]:
    """The layer names of ``source`` among ``<source>/<layer>`` keys, in key order."""
    return [k.split("/", 1)[1] for k in keys if "/" in k and k.split("/", 1)[0] == source]


class PixelFeatureBank:
    """Features of N images, kept at native size, gathered per pixel of the ``out_size``² grid.

    ``features[i]`` maps ``<variant>/<layer>`` to a (C, h, w) map. ``variants`` are the gated
    sources: each must hold the same layers with the same channels in the same order, so that
    a gate can weigh them channel by channel. ``extra`` names ungated sources (e.g. ``ddpm``),
    concatenated after the gate. Keys of other sources are not read.

    Layer order (= channel order) is ``layers`` when given (the gated variants' layers to use),
    else the key order of image 0 (a safetensors file lists its keys sorted by name); an extra
    source always uses all its layers in that key order.

    Storage per key is (N, h*w, C) in ``dtype``, pixel-major, so that gathering pixels is a row
    index. ``names`` label the images in error messages (default ``image <i>``).
    """

    def __init__(
        self,
        features: Sequence[Mapping[str, Tensor]],
        variants: Sequence[str],
        extra: Sequence[str] = (),
        out_size: int = 256,
        layers: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float16,
        names: Sequence[str] | None = None,
    ) -> None:
        if not features:
            raise ValueError("PixelFeatureBank needs the features of at least one image")
        if not variants:
            raise ValueError("PixelFeatureBank needs at least one gated variant")
        both = set(variants) & set(extra)
        if both:
            raise ValueError(f"sources {sorted(both)} are listed both as gated variants and as extra")
        self.names = list(names) if names is not None else [f"image {i}" for i in range(len(features))]
        self.variants, self.extra, self.out_size = list(variants), list(extra), out_size
        first_keys = list(features[0])
        self.layers = list(layers) if layers is not None else _layers_of(first_keys, self.variants[0])
        self.extra_layers = {e: _layers_of(first_keys, e) for e in self.extra}
        for source, found in [(self.variants[0], self.layers), *self.extra_layers.items()]:
            if not found:
                raise DataError(f"{self.names[0]} has no features of {source!r} (its keys: {first_keys[:8]}...)")
        if layers is None:
            self._check_layer_names(first_keys)
        self._keys = [f"{v}/{layer}" for v in self.variants for layer in self.layers]
        self._keys += [f"{e}/{layer}" for e, found in self.extra_layers.items() for layer in found]
        self._store: dict[str, Tensor] = {}
        self._shapes: dict[str, tuple[int, int, int]] = {}
        for i, image in enumerate(features):
            for key in self._keys:
                self._put(i, len(features), key, image, dtype)
            if i == 0:
                self._check_channels()
        self._taps: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    @classmethod
    def from_safetensors(
        cls,
        paths: Sequence[str | Path],
        variants: Sequence[str],
        extra: Sequence[str] = (),
        out_size: int = 256,
        layers: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> PixelFeatureBank:
        """A bank of one features file per image (e.g. the feature cache's), read tensor by
        tensor so that only the bank and one map are in memory at a time."""
        images = [LazyFeatureFile(p) for p in paths]
        return cls(images, variants, extra, out_size, layers, dtype, names=[str(p) for p in paths])

    def _put(self, i: int, count: int, key: str, image: Mapping[str, Tensor], dtype: torch.dtype) -> None:
        try:
            x = image[key]
        except KeyError:
            raise DataError(
                f"{self.names[i]} has no feature {key!r}; extract the features of every image alike"
            ) from None
        if x.ndim != 3:
            raise DataError(f"{self.names[i]}: feature {key!r} has shape {tuple(x.shape)}; expected (C, h, w)")
        if key not in self._store:
            self._shapes[key] = tuple(x.shape)
            self._store[key] = torch.empty(count, x.shape[1] * x.shape[2], x.shape[0], dtype=dtype)
        elif tuple(x.shape) != self._shapes[key]:
            raise DataError(
                f"{self.names[i]}: feature {key!r} has shape {tuple(x.shape)} but {self.names[0]}'s is "
                f"{self._shapes[key]}; extract the features of every image alike"
            )
        self._store[key][i] = x.flatten(1).t()

    def _check_layer_names(self, keys: Sequence[str]) -> None:
        reference = self.variants[0]
        for variant in self.variants[1:]:
            found = _layers_of(keys, variant)
            if found == self.layers:
                continue
            at = next(k for k in range(max(len(found), len(self.layers))) if found[k : k + 1] != self.layers[k : k + 1])
            odd = f"{variant}/{found[at]}" if at < len(found) else f"{variant}/{self.layers[at]} (missing)"
            raise DataError(
                f"{self.names[0]}: variant {variant!r} has layers {found} but {reference!r} has {self.layers}, "
                f"first differing at {odd!r}; gated variants need the same layers in the same order"
            )

    def _check_channels(self) -> None:
        reference = self.variants[0]
        for variant in self.variants[1:]:
            for layer in self.layers:
                key, ref_key = f"{variant}/{layer}", f"{reference}/{layer}"
                if self._shapes[key][0] != self._shapes[ref_key][0]:
                    raise DataError(
                        f"{self.names[0]}: {key!r} has {self._shapes[key][0]} channels but {ref_key!r} has "
                        f"{self._shapes[ref_key][0]}; gated variants need the same layers and channels"
                    )

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return next(iter(self._store.values())).shape[0]

    @property
    def channels(self) -> int:
        """C of :meth:`gather`'s (P, V, C): one variant's layers, concatenated."""
        return sum(self._shapes[f"{self.variants[0]}/{layer}"][0] for layer in self.layers)

    @property
    def extra_channels(self) -> int:
        """E of :meth:`gather`'s (P, E); 0 without extra sources."""
        return sum(self._shapes[f"{e}/{layer}"][0] for e, layers in self.extra_layers.items() for layer in layers)

    @property
    def nbytes(self) -> int:
        """Memory held by the stored features."""
        return sum(t.numel() * t.element_size() for t in self._store.values())

    def to(self, device: torch.device | str) -> PixelFeatureBank:
        """Move the stored features (e.g. to the GPU, where gathering is fastest); returns self."""
        self._store = {k: v.to(device) for k, v in self._store.items()}
        self._taps = {size: tuple(t.to(device) for t in taps) for size, taps in self._taps.items()}
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self._store.values())).device

    # -- gathering ------------------------------------------------------------------------------
    def _axis(self, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if size not in self._taps:
            self._taps[size] = tuple(t.to(self.device) for t in bilinear_taps(size, self.out_size))
        return self._taps[size]

    def _sample(self, key: str, image: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """(P, C) float32: the upsampled map of ``key`` at the pixels, blended from 4 native cells."""
        _, h, w = self._shapes[key]
        rows = self._store[key].flatten(0, 1)
        y0, y1, wy0, wy1 = (t[y] for t in self._axis(h))
        x0, x1, wx0, wx1 = (t[x] for t in self._axis(w))
        base = image * (h * w)

        def cells(yy: Tensor, xx: Tensor) -> Tensor:
            return rows.index_select(0, base + yy * w + xx).float()

        top = wx0[:, None] * cells(y0, x0) + wx1[:, None] * cells(y0, x1)
        bottom = wx0[:, None] * cells(y1, x0) + wx1[:, None] * cells(y1, x1)
        return wy0[:, None] * top + wy1[:, None] * bottom

    def gather(self, image: Tensor, y: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Features at pixels (image[p], y[p], x[p]) of the ``out_size``² grid: (P, V, C) gated
        and (P, E) extra (None without extra sources), float32, as bilinear upsampling with
        ``align_corners=False`` would give them."""
        if not (image.shape == y.shape == x.shape and image.ndim == 1):
            shapes = [tuple(t.shape) for t in (image, y, x)]
            raise ValueError(f"image, y, x must be 1-D tensors of one length, got shapes {shapes}")
        for name, idx, high in (("image", image, self.num_images), ("y", y, self.out_size), ("x", x, self.out_size)):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= high):
                raise IndexError(f"{name} indices must lie in [0, {high}), got [{int(idx.min())}, {int(idx.max())}]")
        image, y, x = image.long(), y.long(), x.long()
        gated = torch.stack(
            [torch.cat([self._sample(f"{v}/{layer}", image, y, x) for layer in self.layers], 1) for v in self.variants],
            dim=1,
        )
        if not self.extra:
            return gated, None
        extra = [self._sample(f"{e}/{name}", image, y, x) for e, names in self.extra_layers.items() for name in names]
        return gated, torch.cat(extra, 1)

    def native_maps(self, i: int) -> tuple[list[Tensor], list[Tensor]]:
        """Image ``i`` at native size: per layer (V, C, h, w) of the gated variants, and per extra
        layer (E, h, w) — views of the stored features, in :meth:`gather`'s channel order."""

        def grid(key: str) -> Tensor:
            c, h, w = self._shapes[key]
            return self._store[key][i].t().reshape(c, h, w)

        gated = [torch.stack([grid(f"{v}/{layer}") for v in self.variants]) for layer in self.layers]
        extra = [grid(f"{e}/{name}") for e, names in self.extra_layers.items() for name in names]
        return gated, extra

    def gather_image(self, i: int, chunk: int = 16384) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """All ``out_size``² pixels of image ``i``, ``chunk`` at a time: (flat pixel index
        ``y * out_size + x``, gated, extra), row-major, each pixel once."""
        total = self.out_size * self.out_size
        for start in range(0, total, chunk):
            flat = torch.arange(start, min(start + chunk, total), device=self.device)
            gated, extra = self.gather(torch.full_like(flat, i), flat // self.out_size, flat % self.out_size)
            yield flat, gated, extra
