"""SPair-71k for semantic correspondence: image pairs with matching keypoints.

Layout under ``root`` (the ``SPair-71k`` folder of the official archive), as the official
devkit and the public loaders (juhongm999/hpf, Junyi42/GeoAware-SC) read it:

- ``JPEGImages/<category>/<imname>.jpg``
- ``PairAnnotation/{trn,val,test}/<pair>.json``, ``<pair>`` = ``<id>-<src>-<trg>:<category>``,
  with ``src_imname``, ``trg_imname``, ``category``, ``src_kps``/``trg_kps`` (lists of
  [x, y], index-matched), ``src_bndbox``/``trg_bndbox`` ([x1, y1, x2, y2]),
  ``src_imsize``/``trg_imsize`` ([W, H, C]) and the pair's difficulty levels
  ``viewpoint_variation``, ``scale_variation`` (0-2), ``truncation``, ``occlusion`` (0-3);
- ``Layout/large/{trn,val,test}.txt``: the pair names of each split, one a line.

Diffusion Hyperfeatures' JSON lists (``spair_71k_train.json``, ``spair_71k_val-360.json``,
``spair_71k_test-360.json``) are a list of dicts with ``source_path``/``target_path``
(relative to ``JPEGImages``), ``source_points``/``target_points`` ([x, y]),
``source_bounding_box``/``target_bounding_box`` and ``category``; they hold no image sizes
and no difficulty levels. ``val-360`` is 20 pairs per category of SPair's val split: the
list on which the content-shift paper reports its best validation.

Coordinates are kept as the annotations store them. SPair's come from PASCAL VOC and are
1-based: boxes and keypoints may sit on x = W or y = H (e.g. the box [2, 1, 372, 500] of
pottedplant/2011_001863.jpg, a 375x500 image). So a point is accepted in [0, W] x [0, H],
one pixel beyond the last pixel centre W-1; anything further is an annotation fault.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from csdiff.data.base import ShardedDataModule
from csdiff.data.checks import check_items
from csdiff.data.reading import DataError, image_size, list_images, read_image
from csdiff.data.samplers import EpochSampler, fit_epoch, trained_in_epoch
from csdiff.data.transforms import resize_exact, to_tensor
from csdiff.metrics.pck import DIFFICULTY_LEVELS

SPLIT_DIRS = {"train": "trn", "val": "val", "test": "test"}
LAYOUT_HINT = (
    "JPEGImages/<category>/*.jpg and PairAnnotation/{trn,val,test}/*.json (optionally Layout/large/{trn,val,test}.txt)"
)
# Apart from the shuffle stream of csdiff.data.segmentation (1): which pairs an epoch draws.
_DRAW_STREAM = 2
_OFFICIAL_KEYS = (
    "src_imname",
    "trg_imname",
    "category",
    "src_kps",
    "trg_kps",
    "src_bndbox",
    "trg_bndbox",
    "src_imsize",
    "trg_imsize",
)
# SPair's difficulty annotations → csdiff.metrics.pck's flag names (HPF: vpvar, scvar, trncn, occln).
_DIFFICULTY_KEYS = {
    "viewpoint_variation": "vp_var",
    "scale_variation": "sc_var",
    "truncation": "truncn",
    "occlusion": "occln",
}
_DHF_KEYS = (
    "source_path",
    "target_path",
    "category",
    "source_points",
    "target_points",
    "source_bounding_box",
    "target_bounding_box",
)


@dataclass(frozen=True)
class Pair:
    """One annotated pair; ``source`` names the annotation it came from, for error messages.
    Sizes are (H, W) from the annotation, None where the list has none (DHF lists); so is
    ``difficulty`` (flag → level, e.g. ``{"vp_var": 2}``) from SPair's difficulty annotations."""

    name: str
    category: str
    src_path: str
    trg_path: str
    src_kps: np.ndarray
    trg_kps: np.ndarray
    src_bbox: np.ndarray
    trg_bbox: np.ndarray
    src_size: tuple[int, int] | None
    trg_size: tuple[int, int] | None
    source: str
    difficulty: dict[str, int] | None = None


# -- coordinates --------------------------------------------------------------------------------
def _hw(size: int | Sequence[int]) -> tuple[float, float]:
    return (float(size), float(size)) if isinstance(size, int) else (float(size[0]), float(size[1]))


def to_eval(kps: torch.Tensor | np.ndarray, size: Sequence[int], eval_size: int | Sequence[int]) -> torch.Tensor:
    """(N, 2) (x, y) in an original image of ``size`` (H, W) → the squashed ``eval_size`` image.

    Pixel-centre convention: pixel i covers [i - 0.5, i + 0.5], so the image spans
    [-0.5, W - 0.5] at either size and x_eval = (x + 0.5) * eval_W / W - 0.5 (y alike).
    This is the mapping of cv2.resize / bilinear interpolation with align_corners=False,
    so a keypoint lands where its pixel went.
    """
    h, w = _hw(size)
    eh, ew = _hw(eval_size)
    kps = torch.as_tensor(kps, dtype=torch.float32)
    scale = kps.new_tensor([ew / w, eh / h])
    return (kps + 0.5) * scale - 0.5


def to_original(
    kps_eval: torch.Tensor | np.ndarray, size: Sequence[int], eval_size: int | Sequence[int]
) -> torch.Tensor:
    """Inverse of :func:`to_eval`: (N, 2) (x, y) in the ``eval_size`` image → original ``size`` (H, W)."""
    h, w = _hw(size)
    eh, ew = _hw(eval_size)
    kps_eval = torch.as_tensor(kps_eval, dtype=torch.float32)
    scale = kps_eval.new_tensor([w / ew, h / eh])
    return (kps_eval + 0.5) * scale - 0.5


# -- reading annotations -------------------------------------------------------------------------
def _points(value: Any, what: str, source: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != 2:
        if arr.size == 0:
            raise DataError(f"{source}: pair has no keypoints ({what} is empty); remove the pair from the list")
        raise DataError(f"{source}: {what} has shape {arr.shape}; expected a list of [x, y]")
    return arr


def _bbox(value: Any, what: str, source: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (4,) or arr[2] < arr[0] or arr[3] < arr[1]:
        raise DataError(f"{source}: {what} is {value}; expected [x1, y1, x2, y2] with x1 <= x2, y1 <= y2")
    return arr


def _imsize(value: Any, what: str, source: str) -> tuple[int, int]:
    """SPair's [W, H, C] → (H, W)."""
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(f"{source}: {what} is {value}; expected [W, H, C]")
    return int(value[1]), int(value[0])


def _difficulty(ann: dict, source: str) -> dict[str, int] | None:
    """The pair's difficulty levels, by csdiff's flag names; None when the file has none."""
    levels = {}
    for key, flag in _DIFFICULTY_KEYS.items():
        if key not in ann:
            continue
        value, count = ann[key], len(DIFFICULTY_LEVELS[flag])
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
            raise DataError(f"{source}: {key} is {value!r}; SPair's levels are 0..{count - 1}")
        levels[flag] = value
    return levels or None


def check_points(pair: Pair, side: str, size: tuple[int, int]) -> None:
    """Raise unless the keypoints and box of ``side`` ("src"/"trg") lie in [0, W] x [0, H]."""
    h, w = size
    kps, bbox = getattr(pair, f"{side}_kps"), getattr(pair, f"{side}_bbox")
    outside = (kps[:, 0] < 0) | (kps[:, 0] > w) | (kps[:, 1] < 0) | (kps[:, 1] > h)
    if outside.any():
        raise DataError(
            f"{pair.source}: {side} keypoints {kps[outside][:3].tolist()} lie outside the {w}x{h} (WxH) image "
            f"{getattr(pair, f'{side}_path')}; fix the annotation or the image"
        )
    if bbox[0] < 0 or bbox[1] < 0 or bbox[2] > w or bbox[3] > h:
        raise DataError(
            f"{pair.source}: {side} box {bbox.tolist()} exceeds the {w}x{h} (WxH) image; fix the annotation"
        )


def _make_pair(
    name: str,
    category: str,
    paths: tuple[str, str],
    kps: tuple[Any, Any],
    boxes: tuple[Any, Any],
    sizes: tuple[tuple[int, int] | None, tuple[int, int] | None],
    keys: tuple[str, str],
    source: str,
    difficulty: dict[str, int] | None = None,
) -> Pair:
    src_kps, trg_kps = _points(kps[0], keys[0], source), _points(kps[1], keys[1], source)
    if len(src_kps) != len(trg_kps):
        raise DataError(
            f"{source}: {len(src_kps)} source but {len(trg_kps)} target keypoints; they must be index-matched"
        )
    src_bbox, trg_bbox = _bbox(boxes[0], "source box", source), _bbox(boxes[1], "target box", source)
    pair = Pair(name, category, *paths, src_kps, trg_kps, src_bbox, trg_bbox, *sizes, source, difficulty)
    for side, size in (("src", sizes[0]), ("trg", sizes[1])):
        if size is not None:
            check_points(pair, side, size)
    return pair


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {what} {path} ({err}); replace it with the file from the dataset") from err


def read_official_pair(path: Path, image_dir: Path) -> Pair:
    """One ``PairAnnotation/<split>/<pair>.json`` file."""
    ann = _load_json(path, "pair annotation")
    missing = [k for k in _OFFICIAL_KEYS if not isinstance(ann, dict) or k not in ann]
    if missing:
        raise DataError(f"pair annotation {path} lacks {missing}; is it a SPair-71k PairAnnotation file?")
    cat, source = str(ann["category"]), str(path)
    return _make_pair(
        path.stem,
        cat,
        (str(image_dir / cat / ann["src_imname"]), str(image_dir / cat / ann["trg_imname"])),
        (ann["src_kps"], ann["trg_kps"]),
        (ann["src_bndbox"], ann["trg_bndbox"]),
        (_imsize(ann["src_imsize"], "src_imsize", source), _imsize(ann["trg_imsize"], "trg_imsize", source)),
        ("src_kps", "trg_kps"),
        source,
        _difficulty(ann, source),
    )


def read_dhf_list(path: Path, image_dir: Path) -> list[Pair]:
    """A Diffusion Hyperfeatures JSON pair list; pair i is named ``<i>-<src>-<trg>:<category>``
    after SPair's own pair names (the lists have none)."""
    if not path.is_file():
        raise DataError(f"pair list {path} not found; fix `pair_lists` or drop it to read PairAnnotation/")
    entries = _load_json(path, "pair list")
    if not isinstance(entries, list):
        raise DataError(f"pair list {path} holds a {type(entries).__name__}; expected a JSON list of pairs")
    pairs = []
    for i, ann in enumerate(entries):
        source = f"{path} entry {i}"
        missing = [k for k in _DHF_KEYS if not isinstance(ann, dict) or k not in ann]
        if missing:
            raise DataError(f"{source} lacks {missing}; expected Diffusion Hyperfeatures' keys {list(_DHF_KEYS)}")
        src, trg = Path(ann["source_path"]), Path(ann["target_path"])
        pair = _make_pair(
            f"{i}-{src.stem}-{trg.stem}:{ann['category']}",
            str(ann["category"]),
            (str(image_dir / src), str(image_dir / trg)),
            (ann["source_points"], ann["target_points"]),
            (ann["source_bounding_box"], ann["target_bounding_box"]),
            (None, None),
            ("source_points", "target_points"),
            source,
        )
        pairs.append(pair)
    return pairs


def read_official_split(root: Path, split: str) -> list[Pair]:
    """The pairs of ``split`` from PairAnnotation/, in Layout/large order when that file exists,
    else every JSON of the split folder sorted by name."""
    folder = root / "PairAnnotation" / SPLIT_DIRS[split]
    if not folder.is_dir():
        raise DataError(f"split folder {folder} does not exist; expected {LAYOUT_HINT} under {root}")
    layout = root / "Layout" / "large" / f"{SPLIT_DIRS[split]}.txt"
    if layout.is_file():
        names = [line.strip() for line in layout.read_text().splitlines() if line.strip()]
        files = [folder / f"{name}.json" for name in names]
        for file in files:
            if not file.is_file():
                raise DataError(f"pair annotation {file} listed in {layout} not found; restore it or remove its line")
    else:
        files = sorted(folder.glob("*.json"))
    image_dir = root / "JPEGImages"
    return [read_official_pair(file, image_dir) for file in files]


# -- items ----------------------------------------------------------------------------------------
def folder_pairs(source: str | Path, target: str | Path, grid: int = 8) -> list[Pair]:
    """Pairs of the images with the same relative path in two folders, for ``predict`` on any
    pictures: the source keypoints are a ``grid`` × ``grid`` lattice over the source image (pixel
    centres of its cells), the target's box is the whole image, and there is no ground truth."""
    src_root, trg_root = Path(source), Path(target)
    for folder in (src_root, trg_root):
        if not folder.is_dir():
            raise DataError(
                f"predict folder {folder} does not exist; pass two folders of images with the same file names"
            )
    targets = {Path(p).relative_to(trg_root): p for p in list_images(trg_root)}
    sources = {Path(p).relative_to(src_root): p for p in list_images(src_root)}
    unpaired = [sources[rel] for rel in sorted(sources.keys() - targets.keys())]
    unpaired += [targets[rel] for rel in sorted(targets.keys() - sources.keys())]
    if unpaired and targets.keys() & sources.keys():
        warnings.warn(_unpaired_message(unpaired, src_root, trg_root), stacklevel=2)
    pairs = []
    for rel, src in sources.items():
        if rel not in targets:
            continue
        (sh, sw), (th, tw) = (read_image(p).shape[:2] for p in (src, targets[rel]))
        cells = (np.arange(grid, dtype=np.float32) + 0.5) / grid
        xs, ys = np.meshgrid(cells * sw - 0.5, cells * sh - 0.5)
        pairs.append(
            Pair(
                name=str(rel.with_suffix("")),
                category="unknown",
                src_path=src,
                trg_path=targets[rel],
                src_kps=np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32),
                trg_kps=np.zeros((0, 2), np.float32),
                src_bbox=np.array([0, 0, sw, sh], np.float32),
                trg_bbox=np.array([0, 0, tw, th], np.float32),
                src_size=(sh, sw),
                trg_size=(th, tw),
                source=f"{src} and {targets[rel]}",
            )
        )
    if not pairs:
        raise DataError(f"no image in {src_root} has a namesake in {trg_root}; pairs are matched by relative path")
    return pairs


def _unpaired_message(unpaired: Sequence[str], src_root: Path, trg_root: Path, shown: int = 5) -> str:
    """One line naming the images without a namesake in the other folder (the first few)."""
    names = ", ".join(unpaired[:shown]) + (f", ... ({len(unpaired)} in all)" if len(unpaired) > shown else "")
    return (
        f"{len(unpaired)} images of the predict folders {src_root} and {trg_root} have no namesake (same relative "
        f"path) in the other folder and get no prediction: {names}"
    )


class SPairDataset(Dataset):
    """Pairs → dicts of both images squashed to ``img_size``² plus annotations in original pixels.

    No augmentation: an item depends on its pair alone, so no epoch or seed is needed here.
    """

    def __init__(self, pairs: Sequence[Pair], img_size: int = 512) -> None:
        self.pairs = list(pairs)
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.pairs)

    @staticmethod
    def check_side(pair: Pair, side: str, actual: tuple[int, int]) -> None:
        """Raise unless the image of ``side`` ("src"/"trg"), (H, W) = ``actual``, fits the pair:
        the annotated size (official files) or, where the list has none, the keypoints and box."""
        path, size = getattr(pair, f"{side}_path"), getattr(pair, f"{side}_size")
        if size is not None and actual != size:
            raise DataError(
                f"image {path} is {actual[1]}x{actual[0]} (WxH) but {pair.source} says {size[1]}x{size[0]} "
                f"({side}_imsize); image and annotations come from different SPair-71k copies"
            )
        if size is None:  # pair lists carry no sizes: check against the image's
            check_points(pair, side, actual)

    def _image(self, pair: Pair, side: str) -> tuple[torch.Tensor, tuple[int, int]]:
        img = read_image(getattr(pair, f"{side}_path"))
        actual = (int(img.shape[0]), int(img.shape[1]))
        self.check_side(pair, side, actual)
        return to_tensor(resize_exact(img, (self.img_size, self.img_size))), actual

    def check_all(self, what: str, num_workers: int = 0) -> None:
        """The up-front check of every pair: each image (read once however many pairs share it)
        whole and sized from its header (``reading.image_size``), then each pair's sides as
        :meth:`_image` checks them when loading, with the same messages. The annotations
        themselves were checked when read."""
        paths = sorted({getattr(pair, f"{side}_path") for pair in self.pairs for side in ("src", "trg")})
        sizes = dict(zip(paths, check_items(paths, image_size, paths, f"{what} images", num_workers)))
        for pair in self.pairs:
            for side in ("src", "trg"):
                self.check_side(pair, side, sizes[getattr(pair, f"{side}_path")])

    def __getitem__(self, index: int) -> dict[str, Any]:
        """src_image/trg_image: float (3, img_size, img_size) in [-1, 1]; src_kps/trg_kps: float
        (N, 2) (x, y) in original pixels; src_size/trg_size: (H, W) of the files; src_bbox/trg_bbox:
        float (4,) x1, y1, x2, y2 in original pixels; category, src_path, trg_path, name;
        difficulty: {flag: level} (empty where the annotations have none).
        Pairs without ground truth (:func:`folder_pairs`) have no trg_kps."""
        pair = self.pairs[index]
        src_image, src_size = self._image(pair, "src")
        trg_image, trg_size = self._image(pair, "trg")
        item = {
            "src_image": src_image,
            "trg_image": trg_image,
            "src_kps": torch.from_numpy(pair.src_kps),
            "trg_kps": torch.from_numpy(pair.trg_kps),
            "src_size": src_size,
            "trg_size": trg_size,
            "src_bbox": torch.from_numpy(pair.src_bbox),
            "trg_bbox": torch.from_numpy(pair.trg_bbox),
            "category": pair.category,
            "src_path": pair.src_path,
            "trg_path": pair.trg_path,
            "name": pair.name,
            "difficulty": dict(pair.difficulty or {}),
        }
        if not len(pair.trg_kps):
            del item["trg_kps"]
        return item


def collate_pairs(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the images; everything else (keypoints with a per-pair N, boxes, sizes, names)
    stays a list in batch order, whatever the batch happens to hold."""
    out: dict[str, Any] = {key: [item[key] for item in batch] for key in batch[0]}
    for key in ("src_image", "trg_image"):
        out[key] = torch.stack(out[key])
    return out


# -- sampling -------------------------------------------------------------------------------------
class PairDrawSampler(EpochSampler):
    """``pairs_per_epoch`` pairs drawn afresh each epoch, as a pure function of (seed, epoch).

    The draw is the head of a (seed, epoch) permutation of all pairs (its own random stream);
    :class:`EpochSampler` over the draw's positions then orders, pads and shards it exactly as
    for segmentation, so DDP ranks get disjoint parts and a mid-epoch resume skips what was
    done. ``pairs_per_epoch`` None or beyond the number of pairs takes every pair.
    """

    def __init__(
        self,
        num_pairs: int,
        seed: int,
        pairs_per_epoch: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        done_in_epoch: Callable[[int], int] | None = None,
    ) -> None:
        if pairs_per_epoch is not None and pairs_per_epoch < 1:
            raise ValueError(f"pairs_per_epoch must be positive or None, got {pairs_per_epoch}")
        self.num_pairs = num_pairs
        draw = num_pairs if pairs_per_epoch is None else min(pairs_per_epoch, num_pairs)
        # EpochSampler only takes the length of what it samples: the positions of the draw
        super().__init__(range(draw), seed, num_replicas, rank, done_in_epoch)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Select the draw and order of ``epoch`` (pairs have no per-epoch augmentation to tell)."""
        self.epoch = epoch

    def draw(self) -> np.ndarray:
        """The pair indices of this epoch, before ordering and sharding."""
        seq = np.random.SeedSequence([self.seed, self.epoch], spawn_key=(_DRAW_STREAM,))
        return np.random.default_rng(seq).permutation(self.num_pairs)[: len(self.dataset)]

    def __iter__(self):
        drawn = self.draw()
        return iter(int(drawn[position]) for position in super().__iter__())


# -- datamodule -----------------------------------------------------------------------------------
class SPairDataModule(ShardedDataModule):
    """SPair-71k pairs for correspondence: train / val (model selection) / test (reported).

    SPair has public test labels, so ``test`` scores its own split; ``predict`` runs on
    ``predict_split`` (test by default). Pairs come from the official PairAnnotation files
    unless ``pair_lists`` gives a Diffusion Hyperfeatures JSON list for a split ("train",
    "val", "test"). ``categories`` keeps those categories, then ``limit`` the first N pairs.
    Training draws ``pairs_per_epoch`` random pairs per epoch (the paper: 5000), one pair
    per step by default. ``predict_folders`` ([source, target]) predicts on pairs of
    same-named images in two folders instead, from a ``predict_grid``² lattice of source points;
    images without a namesake in the other folder are named in a warning and skipped.

    ``check`` (default on) checks the pairs of the stage in ``setup``, before the first step
    (``fit``: train and val; ``validate``: val; ``test``: test; ``predict``: ``predict_split``):
    the annotations are read and checked anyway (keypoints and boxes within the annotated
    image size); the check adds every image, read whole (truncation) and sized from its
    header, not decoded, against its annotations, in ``num_workers`` threads (all CPUs when
    0) with a progress bar on a terminal. ``check: false`` skips it (images are then checked
    when loaded). ``predict_folders`` pairs are read whole when listed and need no check.
    """

    collate = staticmethod(collate_pairs)
    item_name = "pairs"

    def __init__(
        self,
        root: str = "data/spair/SPair-71k",
        img_size: int = 512,
        pair_lists: dict[str, str] | None = None,
        categories: list[str] | None = None,
        pairs_per_epoch: int | None = None,
        batch_size: int = 1,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        limit: int | None = None,
        predict_split: str = "test",
        predict_folders: list[str] | None = None,
        predict_grid: int = 8,
        check: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        unknown = set(pair_lists or {}) - set(SPLIT_DIRS)
        if unknown:
            raise ValueError(f"pair_lists has splits {sorted(unknown)}; expected some of {list(SPLIT_DIRS)}")
        if predict_split not in SPLIT_DIRS:
            raise ValueError(f"predict_split must be one of {list(SPLIT_DIRS)}, got {predict_split!r}")
        if pairs_per_epoch is not None and pairs_per_epoch < 1:
            raise ValueError(f"pairs_per_epoch must be positive or None, got {pairs_per_epoch}")
        self.root = root
        self.img_size = img_size
        self.pair_lists = dict(pair_lists or {})
        self.categories = list(categories) if categories is not None else None
        self.pairs_per_epoch = pairs_per_epoch
        self.seed = seed
        self.limit = limit
        self.predict_split = predict_split
        if predict_folders is not None and len(predict_folders) != 2:
            raise ValueError(f"predict_folders takes [source folder, target folder], got {predict_folders!r}")
        self.predict_folders = predict_folders
        self.predict_grid = predict_grid
        self.check = check
        self.epoch = 0
        self._train_sampler: PairDrawSampler | None = None

    def split_pairs(self, split: str) -> list[Pair]:
        """The checked pairs of ``split`` after the category filter and ``limit``."""
        root = Path(self.root)
        if not root.is_dir():
            raise DataError(
                f"dataset root {root} does not exist; set `root` to the SPair-71k folder that holds {LAYOUT_HINT}"
            )
        image_dir = root / "JPEGImages"
        if not image_dir.is_dir():
            raise DataError(f"image folder {image_dir} does not exist; expected {LAYOUT_HINT} under {root}")
        if split in self.pair_lists:
            pairs = read_dhf_list(Path(self.pair_lists[split]), image_dir)
        else:
            pairs = read_official_split(root, split)
        if self.categories is not None:
            found = sorted({p.category for p in pairs})
            pairs = [p for p in pairs if p.category in self.categories]
            if not pairs:
                raise DataError(f"no {split} pairs of categories {self.categories} under {root}; the split has {found}")
        if not pairs:
            raise DataError(f"no {split} pairs found under {root}; expected {LAYOUT_HINT}")
        pairs = pairs[: self.limit] if self.limit is not None else pairs
        # a missing image fails here, at setup, not after hours of training
        for pair in pairs:
            for path in (pair.src_path, pair.trg_path):
                if not Path(path).is_file():
                    raise DataError(f"image file {path} named by {pair.source} not found; expected {LAYOUT_HINT}")
        return pairs

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": [self.predict_split]}
        wanted = splits.get(stage, list(SPLIT_DIRS)) if stage is not None else list(SPLIT_DIRS)
        for split in wanted:
            if stage == "predict" and self.predict_folders:
                pairs = folder_pairs(*self.predict_folders, grid=self.predict_grid)
            else:
                pairs = self.split_pairs(split)
            self.datasets[split] = SPairDataset(pairs, self.img_size)
        if self.check and not (stage == "predict" and self.predict_folders):
            for split in sorted(wanted, key=lambda s: len(self.datasets[s])):  # the smallest first: fails soonest
                self.datasets[split].check_all(split, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """Select the training draw and order of ``epoch`` (call at each epoch start)."""
        self.epoch = epoch
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        dataset = self._get("train")
        if (epoch := fit_epoch(self.trainer)) is not None:  # the fit's (restored) epoch: see fit_epoch
            self.epoch = epoch
        self._train_sampler = PairDrawSampler(
            len(dataset),
            self.seed,
            self.pairs_per_epoch,
            done_in_epoch=lambda epoch: trained_in_epoch(
                self.trainer, self.batch_size, epoch, len(self._train_sampler)
            ),
        )
        self._train_sampler.set_epoch(self.epoch)
        return self._loader(dataset, self.batch_size, self._train_sampler)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_split)
