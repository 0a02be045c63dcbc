"""Optional speed-ups of the frozen backbone: ``channels_last`` and ``torch.compile``.

Both leave the features equal within float tolerance (tested against the plain extractor).
``compile`` compiles the building blocks (resnets, transformers, down/upsamplers) of the
UNet, the ControlNets and the VAE encoder one by one, not the UNet as a whole: csdiff reads
activations through hooks and stops the UNet early by raising from one, and a hook on a
block (or a module beside it) stays outside the compiled code, so it keeps working. A block
with a requested activation *inside* it (a query projection, an attention map) stays eager.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch._dynamo
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

COMPILED_BLOCKS = (
    ResnetBlock2D,
    Transformer2DModel,
    Downsample2D,
    Upsample2D,
    BasicTransformerBlock,  # PixArt's blocks
    JointTransformerBlock,  # SD3's
    FluxTransformerBlock,
    FluxSingleTransformerBlock,
)
# Blocks of one class share their code, so torch keeps one graph per input shape, dtype and
# adapter set under a single code object; its default limit (8) would send the rest back to
# eager without a word. SD 1.5's UNet, ControlNet and VAE encoder give about 30 shapes per
# batch size.
RECOMPILE_LIMIT = 256


def to_channels_last(modules: Iterable[nn.Module]) -> None:
    """Store 4-d weights NHWC: cuDNN's and oneDNN's preferred convolution layout."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


class CompiledForward:
    """A module's ``forward`` compiled with ``torch.compile``; fake tensors (csdiff's shape
    probe, which runs the UNet without computing) take the eager forward."""

    def __init__(self, forward: Callable, backend: str) -> None:
        self.eager = forward
        self.compiled = torch.compile(forward, backend=backend, dynamic=False)

    def __call__(self, *args, **kwargs):
        if args and isinstance(args[0], FakeTensor):
            return self.eager(*args, **kwargs)
        return self.compiled(*args, **kwargs)


def compile_blocks(root: nn.Module, backend: str, keep_eager: Iterable[str] = ()) -> None:
    """Compile every block of ``root`` that no path in ``keep_eager`` lies strictly inside.

    ``keep_eager`` holds dotted paths below ``root`` where hooks or attention processors
    are installed.
    """
    inner = list(keep_eager)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    for path, module in root.named_modules():
        if not isinstance(module, COMPILED_BLOCKS) or isinstance(module.forward, CompiledForward):
            continue
        if any(p.startswith(path + ".") for p in inner):
            continue
        module.forward = CompiledForward(module.forward, backend)
