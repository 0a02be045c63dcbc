"""DDPM-segmentation's label-scarce datasets Horse-21 and Bedroom-28: layout, labels, splits.

The facts follow the public code of yandex-research/ddpm-segmentation (ICLR 2022):

- Layout (``experiments/<name>/ddpm.json``, ``src/datasets.py``): ``<root>/real/train/`` and
  ``<root>/real/test/``, ``<root>`` being the archive's ``horse_21`` or ``bedroom_28`` folder.
  Each holds square 256² images and, beside each image, its label: a 2-D ``.npy`` array of
  class ids with the same stem (``x.png`` → ``x.npy``). Upstream lists jpg/jpeg/png/gif; our
  paper's research code reads Horse-21 as ``*.png``. Names are numbered (e.g. ``cat_0000001``).
- Classes (``src/data_util.py``) and ``number_class`` / ``ignore_label`` (the json files):
  Horse-21 has 21 classes, background (0) included and scored, and ignore value 255.
  Bedroom-28 has 29 MLP outputs (0..28); its ignore value is 0, the background, which is never
  trained on nor scored, so 28 classes count.
- Splits: 30 train / 30 test (Horse-21) and 40 train / 20 test (Bedroom-28).

Class rules (``class_rule``): ``ddpm_segmentation`` is the above. ``paper_code`` is the
content-shift paper's label-scarce code (Darkbblue/diffusion-content-shift,
``scarce_segmentation_gate/segmentation/data_util.py`` ``get_dataset_setting``): Bedroom-28
with 28 outputs and ignore value 255, so background (0) is trained and scored and class 28
("table staff") has no output and is not scored; its pixels are read as the ignore value (that
code would index past its 28 outputs on them; for the metric nothing changes, since neither
28 nor 255 is scored). Horse-21 is the same under both rules.

Which pixels the metric counts is the metric's business; this module only reads and checks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from csdiff.data.reading import IMAGE_EXTENSIONS, DataError

SPLITS = ("train", "test")
LAYOUT_HINT = "<root>/real/train/ and <root>/real/test/, each holding 256x256 images and same-stem .npy labels"


@dataclass(frozen=True)
class DDPMSegSpec:
    """One dataset's constants.

    ``num_classes`` is the classifier's output count; ``ignore_index`` is the label value that
    is neither trained on nor scored (it may be a real class id, as Bedroom-28's background 0);
    ``scored_classes`` are the ids averaged into mIoU. ``unused_labels`` are label values that
    occur in the files but have no output under ``class_rule``: they are read as ``ignore_index``.
    """

    name: str
    class_names: tuple[str, ...]
    num_classes: int
    ignore_index: int
    scored_classes: tuple[int, ...]
    size: int
    num_train: int
    num_test: int
    class_rule: str = "ddpm_segmentation"
    unused_labels: tuple[int, ...] = ()


HORSE21_CLASSES = (
    "background",
    "person",
    "back",
    "barrel",
    "bridle",
    "chest",
    "ear",
    "eye",
    "forelock",
    "head",
    "hoof",
    "leg",
    "mane",
    "muzzle",
    "neck",
    "nostril",
    "tail",
    "thigh",
    "saddle",
    "shoulder",
    "leg protection",
)
BEDROOM28_CLASSES = (
    "background",
    "bed",
    "bed***footboard",
    "bed***headboard",
    "bed***side rail",
    "carpet",
    "ceiling",
    "chandelier / ceiling fan blade",
    "curtain",
    "cushion",
    "floor",
    "table/nightstand/dresser",
    "table/nightstand/dresser***top",
    "picture / mirrow",
    "pillow",
    "lamp***column",
    "lamp***shade",
    "wall",
    "window",
    "curtain rod",
    "window***frame",
    "chair",
    "picture / mirror***frame",
    "plinth",
    "door / door frame",
    "pouf",
    "wardrobe",
    "plant",
    "table staff",
)  # spelled as upstream spells them ("mirrow" included)

DDPMSEG_DATASETS: dict[str, DDPMSegSpec] = {
    "horse21": DDPMSegSpec(
        name="horse21",
        class_names=HORSE21_CLASSES,
        num_classes=21,
        ignore_index=255,
        scored_classes=tuple(range(21)),
        size=256,
        num_train=30,
        num_test=30,
    ),
    "bedroom28": DDPMSegSpec(
        name="bedroom28",
        class_names=BEDROOM28_CLASSES,
        num_classes=29,
        ignore_index=0,
        scored_classes=tuple(range(1, 29)),
        size=256,
        num_train=40,
        num_test=20,
    ),
}


CLASS_RULES = ("ddpm_segmentation", "paper_code")


def get_spec(name: str, class_rule: str = "ddpm_segmentation") -> DDPMSegSpec:
    """The spec of ``name`` under ``class_rule`` (see the module doc); a ValueError lists the known names."""
    if name not in DDPMSEG_DATASETS:
        raise ValueError(f"unknown DDPM-segmentation dataset {name!r}; choose one of {sorted(DDPMSEG_DATASETS)}")
    if class_rule not in CLASS_RULES:
        raise ValueError(f"unknown class_rule {class_rule!r}; choose one of {list(CLASS_RULES)}")
    spec = DDPMSEG_DATASETS[name]
    if class_rule == "paper_code" and name == "bedroom28":
        return replace(
            spec,
            num_classes=28,
            ignore_index=255,
            scored_classes=tuple(range(28)),
            class_rule=class_rule,
            unused_labels=(28,),
        )
    return replace(spec, class_rule=class_rule)


# -- listing --------------------------------------------------------------------------------------
def _natural_key(path: Path) -> tuple:
    """``img2`` before ``img10``: digit runs compare as numbers (zero-padded names keep their order)."""
    parts = [p for p in re.split(r"(\d+)", path.stem) if p]
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts) + ((2, 0, path.name),)


def list_split(root: str | Path, split: str, spec: DDPMSegSpec) -> list[tuple[Path, Path]]:
    """(image, label) paths of ``split`` ("train"/"test") under ``root``, in natural order of the stems.

    Every image needs its ``.npy`` label and every label its image: a stray file on either
    side means a damaged copy of the archive, so it is an error rather than skipped.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    folder = root / "real" / split
    if not root.is_dir():
        raise DataError(f"{spec.name} root {root} not found; expected {LAYOUT_HINT} (the archive's dataset folder)")
    if not folder.is_dir():
        raise DataError(f"{spec.name}: split folder {folder} not found; expected {LAYOUT_HINT}")
    files = [p for p in folder.iterdir() if p.is_file()]
    images = {p.stem: p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    labels = {p.stem: p for p in files if p.suffix == ".npy"}
    for stem, image in images.items():
        if stem not in labels:
            raise DataError(
                f"image {image} has no label {folder / (stem + '.npy')}; restore the label or remove the image"
            )
    for stem, label in labels.items():
        if stem not in images:
            raise DataError(
                f"label {label} has no image {folder / stem}.<png|jpg>; restore the image or remove the label"
            )
    if not images:
        raise DataError(f"{spec.name}: split folder {folder} holds no images; expected {LAYOUT_HINT}")
    return [(images[stem], labels[stem]) for stem in sorted(images, key=lambda s: _natural_key(images[s]))]


# -- checking -------------------------------------------------------------------------------------
def _show(values: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit].tolist())
    return shown + (f", ... ({len(values)} values)" if len(values) > limit else "")


def read_ddpmseg_label(path: str | Path, spec: DDPMSegSpec) -> np.ndarray:
    """Load a label as (H, W) int64, checked: 2-D, ``spec.size``², integral class ids in
    [0, num_classes), the ignore value or one of ``spec.unused_labels`` (returned as the ignore
    value). Float arrays are accepted when every value is integral."""
    try:
        raw = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"cannot read label file {path} ({err}); replace it with the archive's file") from err
    if raw.ndim != 2:
        raise DataError(f"label file {path} has shape {raw.shape}; expected a 2-D (H, W) array of class ids")
    if raw.shape != (spec.size, spec.size):
        raise DataError(
            f"label file {path} is {raw.shape[1]}x{raw.shape[0]} (WxH); {spec.name} labels are {spec.size}x{spec.size}"
        )
    if raw.dtype.kind == "f":
        bad = raw[~np.isfinite(raw) | (raw != np.round(raw))]
        if bad.size:
            raise DataError(
                f"label file {path} holds non-integer values {_show(np.unique(bad))}; labels must be integer class ids"
            )
    elif raw.dtype.kind not in "biu":
        raise DataError(f"label file {path} has dtype {raw.dtype}; labels must be integer class ids")
    label = raw.astype(np.int64)
    unused = np.isin(label, spec.unused_labels)
    valid = ((label >= 0) & (label < spec.num_classes)) | (label == spec.ignore_index) | unused
    if not valid.all():
        raise DataError(
            f"label file {path} holds values {_show(np.unique(label[~valid]))} outside {spec.name}'s class ids "
            f"0..{spec.num_classes - 1} (ignore value {spec.ignore_index}{''.join(f', {v}' for v in spec.unused_labels)}); "
            "is it a label of another dataset?"
        )
    label[unused] = spec.ignore_index
    return label


def check_image_size(image: np.ndarray, path: str | Path, spec: DDPMSegSpec) -> None:
    """Raise unless ``image`` (H, W[, 3]) is ``spec.size``²: labels live at that size, so a resized
    image would no longer line up with its label."""
    check_image_hw(image.shape[:2], path, spec)


def check_image_hw(size: Sequence[int], path: str | Path, spec: DDPMSegSpec) -> None:
    """:func:`check_image_size` from the (H, W) alone, e.g. read from the file's header."""
    height, width = size
    if (height, width) != (spec.size, spec.size):
        raise DataError(
            f"image {path} is {width}x{height} (WxH); {spec.name} images are {spec.size}x{spec.size}; "
            "use the archive's images (resize image and label together if you must)"
        )


# -- splits and training labels -------------------------------------------------------------------
def random_splits(pairs: Sequence, num_train: int, seeds: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """One (train, test) split of the indices of ``pairs`` per seed, each index in exactly one side.

    The caller pools the official train and test pairs; split k is drawn by
    ``numpy.random.default_rng(seeds[k])`` alone, so it does not depend on the other seeds or
    their order. Both sides are returned sorted. The ``upstream`` protocol (official folders
    as they are) needs no drawing: the caller reads ``real/train`` and ``real/test``.
    """
    total = len(pairs)
    if not 0 < num_train < total:
        raise ValueError(f"num_train must be in 1..{total - 1} for {total} pooled images, got {num_train}")
    splits = []
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(total)
        splits.append((sorted(order[:num_train].tolist()), sorted(order[num_train:].tolist())))
    return splits


def drop_rare_classes(
    label: torch.Tensor | np.ndarray, ignore_index: int, min_pixels: int = 20
) -> torch.Tensor | np.ndarray:
    """A copy of ``label`` where each class with fewer than ``min_pixels`` pixels becomes ``ignore_index``.

    Upstream's training rule (``train_interpreter.py``): a few stray pixels of a class in one
    training image are more likely annotation noise than signal. Test labels keep them.
    """
    if isinstance(label, torch.Tensor):
        values, counts = torch.unique(label, return_counts=True)
        rare = values[(counts < min_pixels) & (values != ignore_index)]
        out = label.clone()
        out[torch.isin(out, rare)] = ignore_index
        return out
    values, counts = np.unique(label, return_counts=True)
    rare = values[(counts < min_pixels) & (values != ignore_index)]
    out = np.array(label, copy=True)
    out[np.isin(out, rare)] = ignore_index
    return out
