"""Download model weights once, on a machine with network access, into a local folder.

csdiff never downloads at training time on offline machines; copy the folder over and pass
it wherever a model string or file is expected. Three kinds of hub repositories, told apart
by their file list, and only the files csdiff reads are fetched:

- a pipeline (``model_index.json``): its configs, tokenizer files and safetensors weights of
  the components csdiff loads (no fp16/EMA duplicates, no safety checker);
- a ControlNet (``config.json`` + ``diffusion_pytorch_model.safetensors`` at the top): those two;
- a LoRA repository (``.safetensors`` files): the one file, chosen with ``--file`` when it holds several.

The script ends by printing the config lines that use the download:

    python checkpoints_scripts/download_weights.py stable-diffusion-v1-5/stable-diffusion-v1-5 --out weights/sd15
    python checkpoints_scripts/download_weights.py lllyasviel/sd-controlnet-canny --out weights/controlnet-canny
    python checkpoints_scripts/download_weights.py some-user/some-loras --file style_v2.safetensors --out weights/loras
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import sys
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlparse

import yaml

from csdiff.cli import _quiet_libraries

_quiet_libraries()  # before csdiff.backbone imports transformers: its import-time notices are no errors

from csdiff.backbone.loading import _VARIANT_MARKS, SNAPSHOT_SUBFOLDERS, WEIGHT_SUBFOLDERS  # noqa: E402

Kind = Literal["pipeline", "controlnet", "lora"]
CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
PIPELINE_SUFFIXES = (".json", ".txt", ".safetensors", ".model")  # .model: T5's SentencePiece vocabulary
PROBE_TIMEOUT_S = 10.0


class DownloadError(RuntimeError):
    """A repository or download that cannot give csdiff what it reads; the message is one line."""


# --- pure: what a repository is and which of its files to fetch (tested offline on file lists) ---


def _is_variant(name: str) -> bool:
    # the same fp16/EMA marks loading skips, so the folder's weight fingerprint equals the hub id's
    return any(mark in PurePosixPath(name).name for mark in _VARIANT_MARKS)


def repo_kind(repo_id: str, files: list[str]) -> Kind:
    """What a repository holds, from its file list alone."""
    if "model_index.json" in files:
        return "pipeline"
    if "config.json" in files and any(f.startswith("diffusion_pytorch_model.") for f in files):
        return "controlnet"
    if any(f.endswith(".safetensors") for f in files):
        return "lora"
    raise DownloadError(
        f"{repo_id} holds nothing csdiff reads: no model_index.json (a pipeline), no config.json with "
        f"diffusion_pytorch_model weights (a ControlNet) and no .safetensors file (a LoRA)"
    )


def pipeline_files(repo_id: str, files: list[str]) -> list[str]:
    """``model_index.json`` and the configs, tokenizer files and plain safetensors weights of
    the components csdiff loads; every weight component present must have safetensors."""
    chosen = ["model_index.json"]
    for name in sorted(files):
        parts = PurePosixPath(name).parts
        if (
            len(parts) == 2
            and parts[0] in SNAPSHOT_SUBFOLDERS
            and name.endswith(PIPELINE_SUFFIXES)
            and not _is_variant(name)
        ):
            chosen.append(name)
    present = {PurePosixPath(f).parts[0] for f in files if len(PurePosixPath(f).parts) == 2}
    unread = [
        s
        for s in WEIGHT_SUBFOLDERS
        if s in present and not any(c.startswith(f"{s}/") and c.endswith(".safetensors") for c in chosen)
    ]
    if unread:
        raise DownloadError(
            f"{repo_id}: {', '.join(unread)} has no .safetensors weights (csdiff reads safetensors only)"
        )
    return chosen


def controlnet_files(repo_id: str, files: list[str]) -> list[str]:
    """The ControlNet's config and its safetensors weights."""
    missing = [f for f in CONTROLNET_FILES if f not in files]
    if missing:
        raise DownloadError(
            f"{repo_id} looks like a ControlNet but has no {' nor '.join(missing)} (csdiff reads safetensors only)"
        )
    return list(CONTROLNET_FILES)


def lora_file(repo_id: str, files: list[str], wanted: str | None) -> str:
    """The one .safetensors file to fetch: the only one, or ``wanted`` (a path in the repo or a file name)."""
    candidates = sorted(f for f in files if f.endswith(".safetensors"))
    if wanted is not None:
        matches = [f for f in candidates if wanted in (f, PurePosixPath(f).name)]
        if len(matches) == 1:
            return matches[0]
        what = "several files named" if matches else "no .safetensors file"
        raise DownloadError(f"{repo_id} has {what} {wanted!r}; its .safetensors files: {', '.join(candidates)}")
    if len(candidates) == 1:
        return candidates[0]
    shown = ", ".join(candidates[:8]) + (f", … ({len(candidates)} in all)" if len(candidates) > 8 else "")
    raise DownloadError(f"{repo_id} holds {len(candidates)} .safetensors files ({shown}): pick one with --file NAME")


def select_files(repo_id: str, files: list[str], wanted: str | None = None) -> tuple[Kind, list[str]]:
    """The repository's kind and the files of it that csdiff reads."""
    kind = repo_kind(repo_id, files)
    if wanted is not None and kind != "lora":
        raise DownloadError(f"{repo_id} is a {kind} repository: --file picks one file of a repository of LoRA files")
    if kind == "pipeline":
        return kind, pipeline_files(repo_id, files)
    if kind == "controlnet":
        return kind, controlnet_files(repo_id, files)
    return kind, [lora_file(repo_id, files, wanted)]


def check_controlnet_config(repo_id: str, config: dict) -> None:
    """A single-model repository is used as a ControlNet; its config says whether it is one
    (checked before its weights are fetched)."""
    name = str(config.get("_class_name", ""))
    if "ControlNet" not in name:
        raise DownloadError(f"{repo_id} holds a {name or 'model of unknown class'} (config.json), not a ControlNet")


def _yaml_scalar(text: str) -> str:
    """``text`` as a YAML flow scalar: plain when YAML reads it back as the same string (not,
    say, a number, null, or broken by a comma), else double-quoted (JSON strings are YAML)."""
    try:
        plain = yaml.safe_load(f"[{text}]") == [text]
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def config_lines(kind: Kind, path: Path | str) -> list[str]:
    """What to write in a config (and, for a pipeline, on the command line) to use a download."""
    where = _yaml_scalar(str(path))
    if kind == "pipeline":
        return [
            "in model.init_args of a config (beside the backbone's other options):",
            f"  backbone: {{model: {where}}}",
            "or on the command line:",
            f"  --model.init_args.backbone.model {shlex.quote(str(path))}",
        ]
    if kind == "controlnet":
        return ["in a variant (model.init_args.variants[...]) of a config:", f"  controlnets: [{{model: {where}}}]"]
    return ["in a variant (model.init_args.variants[...]) of a config:", f"  loras: [{{path: {where}}}]"]


# --- the hub (not called by the tests, which have no network) ---


def check_hub_reachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """One connection to the hub's host. Its client retries a failed listing five times with
    backoff (about 25 s) before reporting; without a network that is a wait for nothing."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise DownloadError(
            f"cannot reach the Hugging Face hub at {endpoint} ({err}): run this on a machine with network access"
        ) from None


def _hub_error(repo_id: str, err: Exception) -> DownloadError:
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set: run this on a machine with network access (and without HF_HUB_OFFLINE)"
    elif isinstance(err, GatedRepoError):
        why = "the repository is gated: accept its terms on the hub and log in (`hf auth login`)"
    elif isinstance(err, RepositoryNotFoundError):
        why = "no such repository, or it is private (log in with `hf auth login`)"
    elif isinstance(err, RevisionNotFoundError):
        why = "no such revision"
    else:
        why = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    return DownloadError(f"cannot download {repo_id}: {why}")


def download(repo_id: str, out: Path, revision: str | None = None, wanted: str | None = None) -> tuple[Kind, Path]:
    """Fetch what csdiff reads of a repository into ``out``; returns its kind and the path to use
    (the folder, or the LoRA file)."""
    from huggingface_hub import constants, hf_hub_download, list_repo_files, snapshot_download

    if not constants.HF_HUB_OFFLINE:  # offline mode: the client itself refuses at once
        check_hub_reachable(constants.ENDPOINT)
    try:
        kind, files = select_files(repo_id, list_repo_files(repo_id, revision=revision), wanted)
        if kind == "pipeline":
            return kind, Path(snapshot_download(repo_id, revision=revision, local_dir=out, allow_patterns=files))
        if kind == "controlnet":
            config = hf_hub_download(repo_id, CONTROLNET_FILES[0], revision=revision, local_dir=out)
            check_controlnet_config(repo_id, json.loads(Path(config).read_text()))
            hf_hub_download(repo_id, CONTROLNET_FILES[1], revision=revision, local_dir=out)
            return kind, Path(out)
        return kind, Path(hf_hub_download(repo_id, files[0], revision=revision, local_dir=out))
    except DownloadError:
        raise
    except Exception as err:  # the hub client raises many types; each ends this run with one line
        raise _hub_error(repo_id, err) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id", help="hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--out", required=True, type=Path, help="local folder to fill")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument(
        "--file",
        default=None,
        help="for a repository of several LoRA files: the one to fetch (name or path in the repo)",
    )
    args = parser.parse_args(argv)
    try:
        kind, path = download(args.repo_id, args.out, args.revision, args.file)
    except DownloadError as err:
        print(f"download_weights: error: {err}", file=sys.stderr)
        return 1
    print(f"downloaded {args.repo_id} ({kind}) to {path}")
    print("\n".join(config_lines(kind, path.resolve())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
