"""The quickstart dataset: synthetic coloured shapes written in the ADE20K layout.

Generated on first use, so the quickstart runs end to end without downloads. Drawn with
another seed than the tiny backbone's training set, so it is data that model has not seen.
Labels store class + 1 (0 unused), so ADE20K's reduce_zero_label maps them back to 0..3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np

from csdiff.data.ade20k import SPLIT_DIRS, ADE20KDataModule
from csdiff.data.reading import DataError
from csdiff.data.synthetic import FAMILY_VERSION, SHAPE_CLASSES, SHAPE_PALETTE, render_shapes

MARKER = ".complete"
# What a generated folder may contain; anything else means root points at foreign data.
_OWN_ENTRIES = {"images", "annotations", MARKER}


def write_shapes_dataset(root: Path, num_train: int, num_val: int, size: int, seed: int) -> None:
    """Render the set into ``root`` (which must not exist): JPEG images, PNG labels (class + 1)."""
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        rng = np.random.default_rng([seed, split_index])
        image_dir = root / "images" / SPLIT_DIRS[split]
        label_dir = root / "annotations" / SPLIT_DIRS[split]
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for i in range(count):
            sample = render_shapes(rng, size)
            name = f"shapes_{SPLIT_DIRS[split]}_{i:05d}"
            bgr = cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR)
            if not cv2.imwrite(str(image_dir / f"{name}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95]):
                raise OSError(f"could not write {image_dir / name}.jpg")
            if not cv2.imwrite(str(label_dir / f"{name}.png"), sample.label + 1):
                raise OSError(f"could not write {label_dir / name}.png")


def ensure_shapes_dataset(root: Path, num_train: int, num_val: int, size: int, seed: int) -> bool:
    """(Re)generate the set unless ``root`` holds a complete one made with these parameters.

    Writes into a temporary sibling folder, renames it into place and only then writes
    the marker, so an interrupted run leaves no marker and is redone. Returns True if it
    generated.
    """
    params = json.dumps(
        {"num_train": num_train, "num_val": num_val, "size": size, "seed": seed, "family": FAMILY_VERSION}
    )
    marker = root / MARKER
    if marker.is_file() and marker.read_text() == params:
        return False
    if root.exists():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWN_ENTRIES)
        if foreign:
            raise DataError(
                f"{root} exists but is not a generated quickstart set (it holds {foreign[:5]}); "
                "point `root` at another folder or delete this one"
            )
    tmp = root.with_name(f".{root.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_shapes_dataset(tmp, num_train, num_val, size, seed)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    marker.write_text(params)
    return True


class QuickstartDataModule(ADE20KDataModule):
    """ADE20K-layout datamodule over generated shapes (4 classes, ``size``² images).

    Crop = ``size``, random resize around ``size`` by ``ratio_range`` (the paper recipe's
    0.5–2 by default), evaluation at native size.
    ``generation_seed`` draws the images; ``seed`` keys the augmentations, as elsewhere.
    ``check`` checks the generated files in ``setup`` as for ADE20K (labels: class + 1).
    """

    def __init__(
        self,
        root: str = "data/quickstart/ADEChallengeData2016",
        num_train: int = 64,
        num_val: int = 16,
        size: int = 128,
        generation_seed: int = 1234,
        batch_size: int = 2,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        seed: int = 0,
        predict_root: str | None = None,
        limit: int | None = None,
        check: bool = True,
    ) -> None:
        super().__init__(
            root=root,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            crop_size=size,
            scale=(size * 4, size),
            ratio_range=ratio_range,
            cat_max_ratio=cat_max_ratio,
            flip_prob=flip_prob,
            photometric=photometric,
            eval_resize=None,
            seed=seed,
            predict_root=predict_root,
            limit=limit,
            check=check,
            class_names=list(SHAPE_CLASSES),
            palette=list(SHAPE_PALETTE),
        )
        self.num_train = num_train
        self.num_val = num_val
        self.size = size
        self.generation_seed = generation_seed

    def prepare_data(self) -> None:
        ensure_shapes_dataset(Path(self.root), self.num_train, self.num_val, self.size, self.generation_seed)
