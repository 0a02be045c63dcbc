"""The `tiny` backbone: a miniature Stable Diffusion 1.5 that csdiff trains itself.

Same block topology as SD 1.5 (so every SD 1.5 activation name is valid on it), small
widths. Its trained weights ship as package data in the ordinary diffusers folder layout
and load through the same code as real weights; `checkpoints_scripts/train_tiny.py`
reproduces them from a seed. This module holds the architecture and the tokenizer
construction, shared by the training script and the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
TINY_SD_DIR = WEIGHTS_DIR / "tiny-sd"
TINY_CONTROLNET_DIR = WEIGHTS_DIR / "tiny-controlnet-canny"
# Names that resolve to the packaged folders (model strings, see csdiff.backbone.loading).
TINY_ALIASES = {"tiny": TINY_SD_DIR, "tiny-controlnet-canny": TINY_CONTROLNET_DIR}
TINY_IMG_SIZE = 128

UNET_CONFIG = dict(
    sample_size=TINY_IMG_SIZE // 8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=16,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=TINY_IMG_SIZE,
)
TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=64,
)
CONTROLNET_EMBEDDING_CHANNELS = (8, 16, 32, 32)
# Stable Diffusion 1.5's scheduler configuration (PNDM, scaled-linear betas).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
)


def save_text_encoder(text_encoder, folder: Path) -> None:
    """Save a ``CLIPTextModel`` with the key names of released SD checkpoints (``text_model.…``).

    transformers 5 drops that prefix when it saves, and transformers 4.x then loads none of
    the weights (silently, as "newly initialized"); every version reads the prefixed names.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    text_encoder.config.save_pretrained(folder)
    state = {
        k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous()
        for k, v in text_encoder.state_dict().items()
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (byte-level BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tokenizer_files(words: list[str], folder: Path, vocab_size: int | None = None) -> int:
    """Write a small CLIP BPE vocabulary (vocab.json, merges.txt) built from caption words.

    Each word gets the merges that spell it (most words end up as one token). Every byte
    stays in the vocabulary, so any text still tokenizes. ``vocab_size`` pads the vocabulary
    with unused entries up to a text encoder's embedding count (BOS/EOS stay the last two
    ids, as in CLIP). Returns the vocabulary size, which the caller checks after loading
    (some transformers versions silently return a near-empty tokenizer for unreadable files).
    """
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    seen: set[str] = set(vocab)
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if merged not in seen:
                merges.append((current, piece))
                vocab.append(merged)
                seen.add(merged)
            current = merged
    if vocab_size is not None:
        if vocab_size < len(vocab) + 2:
            raise ValueError(f"vocab_size {vocab_size} is below the {len(vocab) + 2} entries the words need")
        vocab += [f"<|unused{i}|>" for i in range(vocab_size - 2 - len(vocab))]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )
    return len(vocab)


def t5_tokenizer(words: list[str]):
    """A working T5 (SentencePiece unigram) tokenizer over ``words`` (whole-word pieces) and
    single characters, so any lowercase text tokenizes: for random and test T5 models."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in dict.fromkeys(words)]
    pieces += [(f"\u2581{c}", -4.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def write_tiny_t5(encoder_dir: Path, tokenizer_dir: Path, words: list[str], width: int, **config) -> None:
    """A random two-layer T5 encoder ``width`` wide (8-wide heads) and its tokenizer over
    ``words``, saved in the diffusers layout: the T5 of every tiny test model of a T5 family."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer(words)
    tokenizer.save_pretrained(tokenizer_dir)
    shape = dict(d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=width // 8)
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), **shape, **config)).save_pretrained(encoder_dir)
