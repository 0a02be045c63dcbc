"""Read named activations out of one UNet call.

Plain forward hooks on stock diffusers modules (registered per call, so they see peft's
LoRA wrappers that replace ``to_q`` etc.); attention probabilities through an attention
processor installed only on the layers asked for, while every other layer keeps diffusers'
fast default processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from csdiff.backbone.families import family_of
from csdiff.backbone.names import (
    CROSS_MAPS,
    LATENT_GRID,
    UP_CROSS,
    Activation,
    cross_maps_activations,
    enumerate_activations,
    up_cross_maps,
)


class AttentionMapProcessor:
    """Computes attention explicitly so the head-averaged probabilities can be kept.

    Mathematically the same as diffusers' default scaled-dot-product processor (a test
    compares both); costs O(N_q·N_k) memory, which is why it is installed only where needed.
    """

    def __init__(self, store: dict[tuple[str, str], torch.Tensor], key: str) -> None:
        self.store = store
        self.key = key

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, n_keys, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, n_keys, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B·heads, N_q, N_k)
        kind = "self-map" if encoder_hidden_states is None else "cross-map"
        self.store[(self.key, kind)] = probs.view(batch, attn.heads, *probs.shape[1:]).mean(1)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _joint_queries_keys(attn, hidden_states, context, rotary) -> tuple[torch.Tensor, ...]:
    """(image queries, image keys, text keys), each (B, heads, N, D), exactly as SD3's and FLUX's
    joint attention computes them: projections, per-head RMS norms, FLUX's rotary positions
    (its sequence is text first, then image)."""
    b = hidden_states.shape[0]
    if rotary is None:  # SD3: heads from the projection width
        heads = attn.heads

        def split(x, norm):
            x = x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)
            return x if norm is None else norm(x)

        return (
            split(attn.to_q(hidden_states), attn.norm_q),
            split(attn.to_k(hidden_states), attn.norm_k),
            split(attn.add_k_proj(context), attn.norm_added_k),
        )

    def split(x, norm):
        return norm(x.unflatten(-1, (-1, attn.head_dim)))

    query = split(attn.to_q(hidden_states), attn.norm_q)
    n_text = context.shape[1]
    keys = torch.cat(
        [split(attn.add_k_proj(context), attn.norm_added_k), split(attn.to_k(hidden_states), attn.norm_k)], 1
    )
    cos, sin = rotary
    query = apply_rotary_emb(query, (cos[n_text:], sin[n_text:]), sequence_dim=1)
    keys = apply_rotary_emb(keys, rotary, sequence_dim=1)
    query, keys = query.transpose(1, 2), keys.transpose(1, 2)
    return query, keys[:, :, n_text:], keys[:, :, :n_text]


def _head_mean_softmax(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√D) averaged over heads, (B, N_q, N_k), in float32; one head at a time, so
    FLUX's 24 heads at 1024² need one 4096² map in memory, not 24."""
    total = None
    for h in range(query.shape[1]):
        logits = query[:, h].float() @ keys[:, h].float().transpose(-1, -2) * query.shape[-1] ** -0.5
        total = logits.softmax(-1) if total is None else total + logits.softmax(-1)
    return total / query.shape[1]


class JointAttentionMapProcessor:
    """Keeps the head-averaged attention of a joint (image + text) attention's image queries,
    split at the text keys into an image→image and an image→text map, each renormalised (the
    maps a separate self- and cross-attention would give: every query's row sums to 1).

    The attention itself still runs in the model's own processor, so the block's output is
    unchanged; the maps cost the image queries' and the keys' projections (norms and rotary
    included) once more, and the float32 logits of one head at a time. Only the ``kinds`` asked
    for are computed (FLUX's image→image map at 1024² is 4096² per head).
    """

    def __init__(
        self, processor: Any, store: dict[tuple[str, str], torch.Tensor], key: str, kinds: Sequence[str]
    ) -> None:
        self.processor = processor
        self.store = store
        self.key = key
        self.kinds = set(kinds)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, image_keys, text_keys = _joint_queries_keys(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        for kind, keys in (("self-map", image_keys), ("cross-map", text_keys)):
            if kind in self.kinds:
                self.store[(self.key, kind)] = _head_mean_softmax(query, keys).to(query.dtype)
        rotary = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, **rotary)


def _first_tensor(output: Any, index: int = 0) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[index]
    return output.sample  # diffusers output dataclasses


def _tokens_to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, *size)


def fold_prompt_windows(maps: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, n·window, H, W) cross-attention maps of a prompt encoded in n windows → (B, window, H, W).

    Channel k is the attention mass on position k of every window, summed over windows: the
    channel count is the same for prompts of any length (variants with short and long
    prompts fuse in one gate), and each pixel's channels still sum to 1.
    """
    b, n_keys, h, w = maps.shape
    window = window or n_keys
    if n_keys % window:
        raise ValueError(f"cross-attention over {n_keys} tokens is not a whole number of {window}-token prompt windows")
    return maps.view(b, n_keys // window, window, h, w).sum(1)


def hooked_paths(unet: nn.Module, names: Sequence[str]) -> set[str]:
    """Module paths that capturing ``names`` hooks or gives an attention-map processor."""
    table = enumerate_activations(unet)
    paths = {p for level in up_cross_maps(unet).values() for p in level} if UP_CROSS in names else set()
    acts = [table[n] for n in names if n not in (UP_CROSS, CROSS_MAPS)]
    for act in acts + (cross_maps_activations(unet) if CROSS_MAPS in names else []):
        paths.update(p for p in (act.module, act.spatial) if p not in (None, LATENT_GRID))
    return paths


class UNetStopped(Exception):
    """Raised once the last requested activation is computed: the rest of the UNet is not needed."""


class ActivationCapture:
    """Context manager: hooks for the given names during one UNet call; results in ``features``.

    ``latent_size`` (h, w) is needed only for ``up_cross``, whose maps are resized to it, and
    for FLUX's packed tokens. Cross-attention maps are folded to ``prompt_window`` channels (see
    :func:`fold_prompt_windows`; by default CLIP's 77 on UNets, none on transformers: the
    extractor gives its family's window); ``cross_maps`` averages a transformer's chosen blocks'
    image-to-text maps on its patch grid.
    With ``stop_early`` the UNet call ends right after the last requested activation (in
    network order): the paper's segmentation layers end in ``up_blocks[2]``, and
    ``up_blocks[3]`` alone is about a quarter of the UNet's work at 512². The call then
    returns nothing (the context swallows the stop); features are exactly those of a full call.
    """

    def __init__(
        self,
        unet: nn.Module,
        names: list[str],
        latent_size: tuple[int, int] | None = None,
        prompt_window: int | None = None,
        stop_early: bool = False,
    ) -> None:
        self.unet = unet
        self.names = names
        self.latent_size = latent_size
        self.family = family_of(unet)
        self.prompt_window = prompt_window or (77 if self.family.grammar == "unet" else None)
        self.stop_early = stop_early
        self.table = enumerate_activations(unet)
        self.acts: list[Activation] = [self.table[n] for n in names if n not in (UP_CROSS, CROSS_MAPS)]
        self.up_cross = up_cross_maps(unet) if UP_CROSS in names else {}
        self.cross_maps = cross_maps_activations(unet) if CROSS_MAPS in names else []
        self.features: dict[str, torch.Tensor] = {}
        self._maps: dict[tuple[str, str], torch.Tensor] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        self._handles: list[Any] = []
        self._processors: dict[str, Any] = {}
        self._map_spatial: dict[str, str] = {}

    def _install_map(self, path: str, spatial: str, patch: int = 1, kinds: Sequence[str] = ("cross-map",)) -> None:
        if path not in self._processors:
            self._track_size(spatial, patch)  # first: it may refuse, and nothing is installed then
            attn = self.unet.get_submodule(path)
            self._processors[path] = attn.processor
            if self.family.name in ("sd3", "flux"):  # one joint attention over image and text tokens
                attn.set_processor(JointAttentionMapProcessor(attn.processor, self._maps, path, kinds))
            else:
                attn.set_processor(AttentionMapProcessor(self._maps, path))
            self._map_spatial[path] = spatial

    def _track_size(self, spatial: str, patch: int = 1) -> None:
        """Record the H×W entering a transformer (divided by its patch size), to fold its tokens back into a map."""
        if spatial == LATENT_GRID:  # tokens that arrive packed: their grid is the latent's
            if self.latent_size is None:
                raise ValueError("this model's tokens are laid out on the latent grid: pass latent_size")
            self._sizes[spatial] = tuple(d // patch for d in self.latent_size)
        elif spatial not in self._sizes:
            self._sizes[spatial] = (0, 0)
            module = self.unet.get_submodule(spatial)
            self._handles.append(module.register_forward_pre_hook(self._size_hook(spatial, patch)))

    def __enter__(self) -> "ActivationCapture":
        try:
            self._attach()
        except BaseException:  # a refused request leaves the model as it was
            self.__exit__(None, None, None)
            raise
        return self

    def _attach(self) -> None:
        """Register every hook and map processor the names need."""
        kinds: dict[str, set[str]] = {}  # the maps each attention module must keep
        for act in self.acts + self.cross_maps:
            if act.kind in ("self-map", "cross-map"):
                kinds.setdefault(act.module, set()).add(act.kind)
        for act in self.acts:
            if act.kind in ("self-map", "cross-map"):
                self._install_map(act.module, act.spatial, act.patch, sorted(kinds[act.module]))
                continue
            module = self.unet.get_submodule(act.module)
            if act.kind == "input":
                self._handles.append(module.register_forward_pre_hook(self._input_hook(act.name)))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(act)))
            if act.spatial is not None:
                self._track_size(act.spatial, act.patch)
        for paths in self.up_cross.values():
            for path in paths:
                self._install_map(path, path.rsplit(".transformer_blocks", 1)[0])
        for act in self.cross_maps:
            self._install_map(act.module, act.spatial, act.patch, sorted(kinds[act.module]))
        if self.stop_early and (
            self.acts or self.up_cross or self.cross_maps
        ):  # registered last: the module's own capture hook runs first
            self._handles.append(self.unet.get_submodule(self.last_module()).register_forward_hook(self._stop))

    def last_module(self) -> str:
        """The module, in network order, after which no requested activation is left to compute."""
        order = {name: i for i, name in enumerate(self.table)}
        paths = {p for level in self.up_cross.values() for p in level}
        needed = [a.name for a in self.acts + self.cross_maps] + [
            n for n, a in self.table.items() if a.kind == "cross-map" and a.module in paths
        ]
        return self.table[max(needed, key=order.__getitem__)].module

    @staticmethod
    def _stop(module, args, output) -> None:
        raise UNetStopped

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        for path, processor in self._processors.items():
            self.unet.get_submodule(path).set_processor(processor)
        self._handles.clear()
        self._processors.clear()
        stopped = exc[0] is UNetStopped
        if exc[0] is None or stopped:
            self._collect_maps()
        return stopped

    def _input_hook(self, name: str):
        def hook(module, args):
            self.features[name] = args[0]

        return hook

    def _size_hook(self, path: str, patch: int):
        def hook(module, args, *_):
            self._sizes[path] = tuple(int(d) // patch for d in args[0].shape[-2:])

        return hook

    def _output_hook(self, act: Activation):
        def hook(module, args, output):
            out = _first_tensor(output, act.index)
            if act.kind == "tokens":
                out = _tokens_to_map(out, self._sizes[act.spatial])
            self.features[act.name] = out

        return hook

    def _map_of(self, path: str, kind: str = "cross-map") -> torch.Tensor:
        """(B, N_q, N_k) probabilities → (B, N_k, H, W) on the query grid."""
        probs = self._maps[(path, kind)]
        b, n_q, n_k = probs.shape
        size = self._sizes[self._map_spatial[path]]
        return probs.transpose(1, 2).reshape(b, n_k, *size)

    def _collect_maps(self) -> None:
        if not self._maps:  # the UNet was not called inside the context
            return
        for act in self.acts:
            if act.kind == "self-map":
                self.features[act.name] = self._map_of(act.module, "self-map")
            elif act.kind == "cross-map":
                self.features[act.name] = fold_prompt_windows(self._map_of(act.module), self.prompt_window)
        if self.cross_maps:
            maps = [fold_prompt_windows(self._map_of(a.module), self.prompt_window) for a in self.cross_maps]
            self.features[CROSS_MAPS] = torch.stack(maps).mean(0)
        if self.up_cross:
            if self.latent_size is None:
                raise ValueError("up_cross needs the latent size")
            levels = []
            for paths in self.up_cross.values():
                maps = [fold_prompt_windows(self._map_of(p), self.prompt_window) for p in paths]
                mean = torch.stack(maps).mean(0)
                resized = F.interpolate(mean.float(), size=self.latent_size, mode="bilinear", align_corners=False)
                levels.append(resized.to(mean.dtype))
            self.features[UP_CROSS] = torch.cat(levels, dim=1)
        self._maps.clear()
