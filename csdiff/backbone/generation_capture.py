"""Capture named activations during an ordinary diffusers generation call.

The research code patched diffusers to see features while an image is generated; here the
same hooks as the extractor (same names, same grammar, any UNet family) are attached to a
pipeline's denoiser for the chosen denoising steps only, and removed afterwards: no hook,
attention processor or scheduler wrapper is left behind, also when the call raises.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from csdiff.backbone.capture import ActivationCapture, AttentionMapProcessor
from csdiff.backbone.families import family_of
from csdiff.backbone.names import resolve_layers

_MISSING = object()


class _SideMapProcessor:
    """Keeps attention probabilities while the pipeline's own processor computes the output.

    The attention is computed twice on captured steps, so the generated image stays
    bit-identical to one made without capture (the explicit processor alone is only equal
    within float rounding).
    """

    def __init__(self, original: Any, store: dict[tuple[str, str], torch.Tensor], key: str) -> None:
        self.original = original
        self.maps = AttentionMapProcessor(store, key)

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        self.maps(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


class _StepCapture(ActivationCapture):
    """One UNet call's capture whose attention maps never change the call's output."""

    def _install_map(self, path: str, spatial: str, patch: int = 1, kinds: Sequence[str] = ("cross-map",)) -> None:
        if path not in self._processors:
            super()._install_map(path, spatial, patch, kinds)
            self.unet.get_submodule(path).set_processor(_SideMapProcessor(self._processors[path], self._maps, path))


def _timestep_value(t: Any) -> float:
    return float(t.flatten()[0].item()) if isinstance(t, torch.Tensor) else float(t)


class GenerationCapture:
    """Context manager: stores ``layers`` at chosen denoising steps of ``pipe(...)`` calls.

    A step is chosen by its index in the pipeline's denoising loop (``steps``; the ``i`` of
    ``callback_on_step_end``) or by its timestep value (``timesteps``). Results, for the last
    generation run inside the context: ``features[step][layer]`` (B, C, H, W), detached, and
    ``timesteps_seen[step]``. With classifier-free guidance the batch holds the unconditional
    half first, as the pipeline batches it; a denoiser called several times in one step gets
    its calls concatenated along the batch axis, in call order.
    """

    def __init__(
        self,
        pipe: Any,
        layers: str | Iterable[str],
        steps: Iterable[int] = (),
        timesteps: Iterable[float] = (),
    ) -> None:
        unet = getattr(pipe, "unet", None)
        if not isinstance(unet, nn.Module):
            raise TypeError(
                f"capture needs a pipeline whose denoiser is a UNet (`pipe.unet`); {type(pipe).__name__} has none"
            )
        self.unet = unet
        self.scheduler = pipe.scheduler
        self.names = resolve_layers(unet, layers)
        self.steps = sorted({int(s) for s in steps})
        self.timesteps = [float(t) for t in timesteps]
        if not self.steps and not self.timesteps:
            raise ValueError(
                "choose at least one denoising step (`steps`, indices from 0) or timestep value (`timesteps`)"
            )
        if self.steps and self.steps[0] < 0:
            raise ValueError(f"step indices count from 0; got {self.steps[0]}")
        tokenizers = [getattr(pipe, n, None) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")]
        self.prompt_window = family_of(unet).prompt_window([t for t in tokenizers if t is not None])
        self.features: dict[int, dict[str, torch.Tensor]] = {}
        self.timesteps_seen: dict[int, float] = {}
        self._step = 0
        self._active: _StepCapture | None = None
        self._handles: list[Any] = []
        self._patched: dict[str, Any] = {}

    def __enter__(self) -> "GenerationCapture":
        self._handles = [
            self.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True),
            self.unet.register_forward_hook(self._after_unet),
        ]
        self._patch("set_timesteps", self._on_set_timesteps)
        self._patch("step", self._on_step)
        return self

    def __exit__(self, *exc) -> bool:
        self._discard_active(exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, previous in self._patched.items():
            if previous is _MISSING:
                delattr(self.scheduler, name)
            else:
                setattr(self.scheduler, name, previous)
        self._patched.clear()
        if exc[0] is None:
            self._warn_missed()
        return False

    def _patch(self, name: str, wrap) -> None:
        """Wrap a scheduler method on this instance only (restored on exit)."""
        self._patched[name] = vars(self.scheduler).get(name, _MISSING)
        setattr(self.scheduler, name, wrap(getattr(self.scheduler, name)))

    def _on_set_timesteps(self, original):
        def set_timesteps(*args, **kwargs):
            self._step = 0  # a new generation starts: its results replace the previous one's
            self.features, self.timesteps_seen = {}, {}
            return original(*args, **kwargs)

        return set_timesteps

    def _on_step(self, original):
        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            self._step += 1
            return out

        return step

    def _matches(self, t: float) -> bool:
        return any(math.isclose(t, v, abs_tol=1e-4) for v in self.timesteps)

    def _chosen(self, t: float) -> bool:
        return self._step in self.steps or self._matches(t)

    def _before_unet(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._discard_active((RuntimeError, None, None))  # a call that raised inside a caught exception
        sample = args[0] if args else kwargs["sample"]
        t = _timestep_value(args[1] if len(args) > 1 else kwargs["timestep"])
        if self._chosen(t):
            self.timesteps_seen[self._step] = t
            self._active = _StepCapture(self.unet, self.names, tuple(sample.shape[-2:]), self.prompt_window)
            self._active.__enter__()

    def _after_unet(self, module: nn.Module, args: tuple, output: Any) -> None:
        capture, self._active = self._active, None
        if capture is None:
            return
        capture.__exit__(None, None, None)
        stored = self.features.setdefault(self._step, {})
        for name in self.names:
            value = capture.features[name].detach()
            stored[name] = torch.cat([stored[name], value]) if name in stored else value

    def _discard_active(self, exc: tuple) -> None:
        capture, self._active = self._active, None
        if capture is not None:
            capture.__exit__(*exc)

    def _warn_missed(self) -> None:
        """A chosen step that the generation never reached is worth a word, not a silent gap."""
        missed = [s for s in self.steps if s not in self.features]
        seen = set(self.timesteps_seen.values())
        missed_t = [t for t in self.timesteps if not any(math.isclose(t, v, abs_tol=1e-4) for v in seen)]
        if self._step and (missed or missed_t):
            warnings.warn(
                f"capture: steps {missed} / timesteps {missed_t} were never reached "
                f"(the last generation ran {self._step} denoising steps)",
                stacklevel=3,
            )


def capture_generation(
    pipe: Any, layers: str | Iterable[str], steps: Iterable[int] = (), timesteps: Iterable[float] = ()
) -> GenerationCapture:
    """``with capture_generation(pipe, ["up-level1-upsampler-out"], steps=[1, 3]) as cap: pipe(...)``."""
    return GenerationCapture(pipe, layers, steps, timesteps)
