"""Feature variants: one combination of guidance techniques each (DESIGN §1).

Plain dataclasses of plain values, so configs (YAML, jsonargparse) and checkpoints
(hyperparameters loaded with ``weights_only=True``) hold them as ordinary dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from string import Formatter
from typing import Literal

from csdiff.backbone.lora import LoRA


@dataclass(frozen=True)
class ControlNet:
    """A ControlNet applied at the extraction timestep.

    ``condition``: ``canny`` (OpenCV Canny of the input at ``img_size``, thresholds
    ``low``/``high``) or ``provided`` (the caller passes the condition images).
    """

    model: str
    condition: Literal["canny", "provided"] = "canny"
    low: int = 100
    high: int = 200
    scale: float = 1.0


@dataclass(frozen=True)
class Variant:
    """Name, prompt, LoRAs, ControlNets, optional multi-step denoising, noise seed.

    ``prompt`` may hold ``{field}``s filled per image (e.g. "a photo of a {category}", as DIFT
    prompts each SPair pair): the caller passes the values (``prompt_fields`` of the extractor's
    ``forward``). A prompt without fields is used as written.

    ``weights``: the variant's own whole-model weights instead of the backbone's: a merged
    checkpoint of the same family and architecture (a single ``.ckpt``/``.safetensors`` file,
    configured by the backbone's folder, or a diffusers folder), e.g. the paper's LoRAs, which
    were released merged into SD 1.5. Its UNet (chain and final call) and text encoder are used
    for this variant only.
    """

    name: str
    prompt: str = ""
    seed: int = 0
    loras: tuple[LoRA, ...] = field(default_factory=tuple)
    controlnets: tuple[ControlNet, ...] = field(default_factory=tuple)
    denoise_from: int | None = None
    weights: str | None = None

    def __post_init__(self) -> None:
        # Accept lists and plain dicts (YAML, hyperparameters) as well as the dataclasses.
        object.__setattr__(
            self, "loras", tuple(lora if isinstance(lora, LoRA) else LoRA(**lora) for lora in self.loras)
        )
        object.__setattr__(
            self, "controlnets", tuple(c if isinstance(c, ControlNet) else ControlNet(**c) for c in self.controlnets)
        )
        if self.weights is not None and self.loras:
            raise ValueError(
                f"variant {self.name!r}: give either `weights` (a merged checkpoint) or `loras`, not both; to add a "
                f"LoRA on top of merged weights, merge it into them too or use the merged file as the backbone"
            )

    @property
    def fields(self) -> tuple[str, ...]:
        """The names of the prompt's ``{field}``s, in order of appearance (none for a plain prompt)."""
        return prompt_fields(self.prompt)

    def filled(self, values: Mapping[str, str]) -> Variant:
        """This variant with its prompt's fields filled from ``values`` (itself when the prompt has none)."""
        if not self.fields:
            return self
        missing = [name for name in self.fields if name not in values]
        if missing:
            raise ValueError(
                f"variant {self.name!r}: its prompt {self.prompt!r} needs {missing} per image, got {sorted(values)}; "
                f"pass them as prompt_fields (the correspondence task passes each pair's category)"
            )
        return replace(self, prompt=self.prompt.format_map(dict(values)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loras"] = [dict(lora) for lora in d["loras"]]
        d["controlnets"] = [dict(c) for c in d["controlnets"]]
        return d


def prompt_fields(prompt: str) -> tuple[str, ...]:
    """Named ``{field}``s of a prompt template; a prompt that is no valid template (a lone brace)
    has none and is used as written."""
    try:
        return tuple(dict.fromkeys(name for _, name, _, _ in Formatter().parse(prompt) if name))
    except ValueError:
        return ()


def as_variant(v: Variant | dict) -> Variant:
    """A Variant from a Variant or a plain dict; unknown keys name the valid ones."""
    if isinstance(v, Variant):
        return v
    if not isinstance(v, dict):
        raise TypeError(f"a variant must be a mapping or Variant, got {type(v).__name__}")
    valid = set(Variant.__dataclass_fields__)
    unknown = sorted(set(v) - valid)
    if unknown:
        raise ValueError(
            f"unknown variant key(s) {unknown} in variant {v.get('name', '?')!r}; valid keys: {sorted(valid)}"
        )
    return Variant(**v)
