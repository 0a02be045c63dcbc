"""Prompt encoding: CLIP without the 77-token limit (SD, SDXL), and as PixArt's, SD3's and FLUX's pipelines encode.

A fine-grained prompt may exceed CLIP's 77 tokens: it is cut into windows of 75 tokens,
each wrapped in BOS/EOS (and padded to 77), encoded separately and concatenated along the
token axis, so the UNet's cross-attention sees every word.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer


def prompt_windows(tokenizer: CLIPTokenizer, prompt: str) -> torch.Tensor:
    """Token ids of shape (n_windows, 77): BOS + up to 75 tokens + EOS, padded."""
    length = tokenizer.model_max_length
    body = length - 2
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False).input_ids
    chunks = [ids[i : i + body] for i in range(0, len(ids), body)] or [[]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for chunk in chunks:
        row = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        rows.append(row + [pad] * (length - len(row)))
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def encode_prompt(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompt: str) -> torch.Tensor:
    """Text embedding (1, 77·n_windows, D) for the UNet's cross-attention."""
    ids = prompt_windows(tokenizer, prompt).to(text_encoder.device)
    hidden = text_encoder(ids)[0]  # (n_windows, 77, D)
    return hidden.reshape(1, -1, hidden.shape[-1])


@torch.no_grad()
def encode_prompt_sdxl(tokenizers: tuple, text_encoders: tuple, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning: (1, 77·n_windows, D1 + D2) and the pooled embedding (1, P).

    As SDXL's pipeline does: each encoder's penultimate hidden states, concatenated along the
    feature axis; the pooled, projected embedding of the second encoder (here of the first
    window). Both tokenizations are cut into the same number of windows (the shorter one is
    padded with empty windows), so the two token axes line up.
    """
    ids = [prompt_windows(tokenizer, prompt) for tokenizer in tokenizers]
    n = max(w.shape[0] for w in ids)
    hidden, pooled = [], None
    for tokenizer, encoder, windows in zip(tokenizers, text_encoders, ids):
        if windows.shape[0] < n:
            windows = torch.cat([windows, prompt_windows(tokenizer, "").expand(n - windows.shape[0], -1)])
        out = encoder(windows.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2].reshape(1, -1, out.hidden_states[-2].shape[-1]))
        if out[0].ndim == 2:  # the projected, pooled output of CLIPTextModelWithProjection
            pooled = out[0][:1]
    if pooled is None:
        raise ValueError(
            "SDXL needs a text encoder with projection (CLIPTextModelWithProjection) as its second encoder"
        )
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_prompt_t5(tokenizers: tuple, text_encoders: tuple, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A T5 family's text conditioning (PixArt): (1, L, D) and the attention mask (1, L).

    As PixArt's pipelines do (without caption cleaning): padded to the model's maximum length
    L (the tokenizer's ``model_max_length``: 120 tokens for PixArt-α, 300 for Σ), longer
    prompts truncated, the encoder run with the padding masked out.
    """
    tokenizer, encoder = tokenizers[0], text_encoders[0]
    tokens = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    _warn_if_cut(tokenizer, prompt, tokenizer.model_max_length, "T5")
    mask = tokens.attention_mask.to(encoder.device)
    return encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0], mask


def _warn_if_cut(tokenizer, prompt: str, length: int, name: str) -> None:
    n = len(tokenizer(prompt, add_special_tokens=True, verbose=False).input_ids)
    if n > length:
        warnings.warn(
            f"prompt {prompt[:60]!r}… has {n} {name} tokens: the model reads its first {length} (as its pipeline "
            f"does); shorten it so no word is lost",
            stacklevel=3,
        )


@torch.no_grad()
def encode_prompt_sd3(tokenizers: tuple, text_encoders: tuple, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's joint text conditioning: (1, 77 + L, D_T5) and the pooled embedding (1, P_L + P_G).

    As SD3's pipeline does: both CLIPs' penultimate hidden states (77 tokens each, cut there),
    concatenated along features and zero-padded to T5's width, then T5's L tokens (the
    tokenizer's ``model_max_length``: 256, the pipeline's default) appended along the tokens;
    the two CLIPs' pooled projections concatenated.
    """
    hidden, pooled = [], []
    for tokenizer, encoder in zip(tokenizers[:2], text_encoders[:2]):
        _warn_if_cut(tokenizer, prompt, tokenizer.model_max_length, "CLIP")
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        out = encoder(torch.tensor([ids], device=encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    t5_tokenizer, t5 = tokenizers[2], text_encoders[2]
    _warn_if_cut(t5_tokenizer, prompt, t5_tokenizer.model_max_length, "T5")
    ids = t5_tokenizer(
        prompt, padding="max_length", max_length=t5_tokenizer.model_max_length, truncation=True, add_special_tokens=True
    ).input_ids
    t5_hidden = t5(torch.tensor([ids], device=t5.device))[0]
    clip = torch.cat(hidden, dim=-1)
    clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5_hidden.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)


@torch.no_grad()
def encode_prompt_flux(tokenizers: tuple, text_encoders: tuple, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.1's text conditioning: T5's (1, L, D) hidden states and CLIP-L's pooled output (1, P).

    As FLUX's pipeline does: CLIP reads 77 tokens (cut there) for its pooled output only; T5 reads
    L tokens (the tokenizer's ``model_max_length``: 512, the pipeline's default), unmasked.
    """
    (clip_tokenizer, t5_tokenizer), (clip, t5) = tokenizers[:2], text_encoders[:2]
    _warn_if_cut(clip_tokenizer, prompt, clip_tokenizer.model_max_length, "CLIP")
    ids = clip_tokenizer(
        prompt, padding="max_length", max_length=clip_tokenizer.model_max_length, truncation=True
    ).input_ids
    pooled = clip(torch.tensor([ids], device=clip.device), output_hidden_states=False).pooler_output
    _warn_if_cut(t5_tokenizer, prompt, t5_tokenizer.model_max_length, "T5")
    ids = t5_tokenizer(
        prompt, padding="max_length", max_length=t5_tokenizer.model_max_length, truncation=True, add_special_tokens=True
    ).input_ids
    return t5(torch.tensor([ids], device=t5.device))[0], pooled
