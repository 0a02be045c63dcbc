"""SPair-71k data: both pair-list formats, squashing and keypoint mapping, draws, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import load_script

from csdiff.data import DataError, SPairDataModule
from csdiff.data.spair import PairDrawSampler, collate_pairs, to_eval, to_original

fake = load_script("make_fake_spair")
IMG = 96


@pytest.fixture(scope="module")
def spair(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return fake.make_fake_spair(tmp_path_factory.mktemp("spair") / "SPair-71k")


@pytest.fixture
def spair_copy(spair, tmp_path) -> Path:
    """A copy to break."""
    return Path(shutil.copytree(spair[0], tmp_path / "SPair-71k"))


def _dm(root: Path, **kwargs) -> SPairDataModule:
    return SPairDataModule(root=str(root), img_size=IMG, **kwargs)


def _key(pair) -> tuple:
    """What a pair is, with image paths below JPEGImages (copies of the root compare equal)."""
    paths = (Path(pair.src_path).parts[-2:], Path(pair.trg_path).parts[-2:])
    annotations = (pair.src_kps, pair.trg_kps, pair.src_bbox, pair.trg_bbox)
    return (pair.category, *paths, *(a.tolist() for a in annotations))


def test_official_and_dhf_lists_give_the_same_pairs(spair, tmp_path):
    root, lists = spair
    official = _dm(root)
    dhf = _dm(root, pair_lists={k: str(v) for k, v in lists.items()})
    no_layout = Path(shutil.copytree(root, tmp_path / "SPair-71k"))
    shutil.rmtree(no_layout / "Layout")
    for split, n in (("train", 18), ("val", 6), ("test", 6)):
        a, b = official.split_pairs(split), dhf.split_pairs(split)
        assert len(a) == n and [_key(p) for p in a] == [_key(p) for p in b]
        assert [p.name for p in a] == [p.name for p in b]  # DHF names follow SPair's <id>-<src>-<trg>:<cat>
        # without Layout/large the split folder's files are read, sorted by name
        c = _dm(no_layout).split_pairs(split)
        assert sorted(_key(p) for p in c) == sorted(_key(p) for p in a)
    item_a, item_b = official.split_pairs("val")[0], dhf.split_pairs("val")[0]
    assert item_a.src_size is not None and item_b.src_size is None


def test_items_squash_images_and_keypoints_map_back(spair):
    dm = _dm(spair[0])
    dm.setup("validate")
    dataset = dm.datasets["val"]
    for index in range(len(dataset)):
        item = dataset[index]
        pair = dataset.pairs[index]
        for side in ("src", "trg"):
            image = item[f"{side}_image"]
            assert image.shape == (3, IMG, IMG) and image.dtype == torch.float32
            assert -1.0 <= image.min() and image.max() <= 1.0
            h, w = item[f"{side}_size"]
            assert cv2.imread(getattr(pair, f"{side}_path")).shape[:2] == (h, w) and h != w
            kps = item[f"{side}_kps"]
            assert kps.shape[1] == 2 and kps.dtype == torch.float32
            ev = to_eval(kps, (h, w), IMG)
            assert torch.allclose(to_original(ev, (h, w), IMG), kps, atol=1e-4)
            # real correspondences: the squashed image shows keypoint k's dot colour at its mapped position
            ids = [fake.KP_COLOURS.index(tuple(c)) for c in _colours_at(pair, side)]
            rgb = ((image + 1) * 127.5).round().permute(1, 2, 0)
            for (x, y), k in zip(ev.round().long().tolist(), ids):
                assert np.abs(rgb[y, x].numpy() - np.array(fake.KP_COLOURS[k])).max() < 60
        assert item["src_kps"].shape == item["trg_kps"].shape
        assert _colours_at(pair, "src") == _colours_at(pair, "trg")
        assert item["src_bbox"].shape == (4,) and item["category"] in fake.SHAPES
        assert item["name"] == Path(dm.datasets["val"].pairs[index].source).stem


def _colours_at(pair, side: str) -> list[tuple[int, ...]]:
    """The nearest dot colour at each original keypoint (decoded JPEG, RGB)."""
    img = cv2.imread(getattr(pair, f"{side}_path"))[..., ::-1].astype(int)
    palette = np.array(fake.KP_COLOURS)
    out = []
    for x, y in getattr(pair, f"{side}_kps").astype(int):
        out.append(tuple(palette[np.abs(palette - img[y, x]).sum(1).argmin()].tolist()))
    return out


def test_eval_mapping_convention():
    kps = torch.tensor([[-0.5, -0.5], [99.5, 49.5], [0.0, 0.0]])
    ev = to_eval(kps, (50, 100), (100, 200))  # (H, W) → (H, W): twice the size
    assert torch.allclose(ev, torch.tensor([[-0.5, -0.5], [199.5, 99.5], [0.5, 0.5]]))
    assert torch.allclose(to_original(np.array([[0.5, 0.5]]), (50, 100), (100, 200)), torch.tensor([[0.0, 0.0]]))


def test_collate_keeps_variable_annotations_as_lists(spair):
    dm = _dm(spair[0], eval_batch_size=3)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["src_image"].shape == (3, 3, IMG, IMG) and batch["trg_image"].shape == (3, 3, IMG, IMG)
    for key in ("src_kps", "trg_kps", "src_bbox", "src_size", "category", "name"):
        assert isinstance(batch[key], list) and len(batch[key]) == 3
    same = collate_pairs([dm.datasets["test"][0]] * 2)
    assert isinstance(same["src_kps"], list)  # even when N happens to match


def test_category_filter_and_limit(spair):
    dm = _dm(spair[0], categories=["cat", "dog"], limit=5)
    pairs = dm.split_pairs("train")
    assert len(pairs) == 5 and {p.category for p in pairs} <= {"cat", "dog"}
    assert {p.category for p in _dm(spair[0], categories=["bird"]).split_pairs("val")} == {"bird"}
    with pytest.raises(DataError, match="no val pairs of categories.*'bird', 'cat', 'dog'"):
        _dm(spair[0], categories=["horse"]).split_pairs("val")


def test_predict_uses_test_split(spair):
    dm = _dm(spair[0])
    dm.setup("predict")
    assert set(dm.datasets) == {"test"} and len(dm.predict_dataloader()) == 6


def test_pairs_per_epoch_draws():
    def epoch(e: int, seed: int = 0, **kw) -> list[int]:
        sampler = PairDrawSampler(100, seed, pairs_per_epoch=10, **kw)
        sampler.set_epoch(e)
        return list(sampler)

    first = epoch(0)
    assert len(first) == 10 == len(set(first)) and all(0 <= i < 100 for i in first)
    assert first == epoch(0) and first != epoch(1) and set(first) != set(epoch(1)) and first != epoch(0, seed=1)
    shards = [epoch(3, num_replicas=2, rank=r) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5 and not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(epoch(3))
    everything = PairDrawSampler(7, 0, pairs_per_epoch=None)
    assert sorted(everything) == list(range(7)) and len(PairDrawSampler(7, 0, 50)) == 7
    resumed = PairDrawSampler(100, 0, 10, done_in_epoch=lambda e: 4)
    assert list(resumed) == first[4:]


def test_train_loader_draws_per_epoch(spair):
    dm = _dm(spair[0], pairs_per_epoch=4, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 4
    names = []
    for e in range(2):
        dm.set_epoch(e)
        names.append([b["name"][0] for b in loader])
    assert names[0] != names[1] and len(set(names[0])) == 4


def _first_val(root: Path) -> tuple[Path, dict]:
    path = root / "PairAnnotation" / "val" / f"{(root / 'Layout/large/val.txt').read_text().split()[0]}.json"
    return path, json.loads(path.read_text())


def _edit(root: Path, change) -> Path:
    path, ann = _first_val(root)
    change(ann)
    path.write_text(json.dumps(ann))
    return path


def test_missing_root_split_and_image(spair_copy, tmp_path):
    with pytest.raises(DataError, match=f"dataset root {tmp_path / 'nope'} does not exist"):
        _dm(tmp_path / "nope").split_pairs("val")
    shutil.rmtree(spair_copy / "PairAnnotation" / "test")
    with pytest.raises(DataError, match=r"split folder .*PairAnnotation/test does not exist"):
        _dm(spair_copy).split_pairs("test")
    path, ann = _first_val(spair_copy)
    image = spair_copy / "JPEGImages" / ann["category"] / ann["src_imname"]
    image.unlink()
    with pytest.raises(DataError, match=f"image file {image} named by {path} not found"):
        _dm(spair_copy).split_pairs("val")
    (spair_copy / "Layout/large/val.txt").write_text("0-nothing-here:cat\n")
    with pytest.raises(DataError, match="0-nothing-here:cat.json listed in .*val.txt not found"):
        _dm(spair_copy).split_pairs("val")


def test_unreadable_image(spair_copy):
    _, ann = _first_val(spair_copy)
    image = spair_copy / "JPEGImages" / ann["category"] / ann["trg_imname"]
    image.write_bytes(b"not a jpeg")
    dm = _dm(spair_copy, check=False)  # the load-time check
    dm.setup("validate")
    with pytest.raises(DataError, match=f"cannot decode image file {image}"):
        dm.datasets["val"][0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(src_kps=[], trg_kps=[]), "pair has no keypoints"),
        (lambda a: a.update(trg_kps=a["trg_kps"][:-1]), "source but .* target keypoints"),
        (lambda a: a["src_kps"].__setitem__(0, [a["src_imsize"][0] + 2, 3]), "src keypoints .* lie outside"),
        (lambda a: a.pop("trg_bndbox"), r"lacks \['trg_bndbox'\]"),
        (lambda a: a.update(truncation=4), r"truncation is 4; SPair's levels are 0..3"),
        (lambda a: a.update(viewpoint_variation="hard"), r"viewpoint_variation is 'hard'; SPair's levels are 0..2"),
    ],
)
def test_malformed_annotation_names_the_file(spair_copy, change, message):
    path = _edit(spair_copy, change)
    with pytest.raises(DataError, match=f"{path}.*{message}" if "lacks" not in message else message) as err:
        _dm(spair_copy).split_pairs("val")
    assert str(path) in str(err.value)


def test_keypoint_on_the_far_edge_is_accepted(spair_copy):
    """SPair's 1-based coordinates may equal W or H."""
    _edit(spair_copy, lambda a: a["src_kps"].__setitem__(0, a["src_imsize"][:2]))
    _dm(spair_copy).split_pairs("val")


def test_image_size_differing_from_annotation(spair_copy):
    path = _edit(spair_copy, lambda a: a.update(src_imsize=[a["src_imsize"][0] + 40, a["src_imsize"][1], 3]))
    dm = _dm(spair_copy, check=False)  # the load-time check
    dm.setup("validate")
    with pytest.raises(DataError, match=f"but {path} says .*src_imsize"):
        dm.datasets["val"][0]


def test_dhf_list_errors_name_the_file(spair, tmp_path):
    root, lists = spair
    entries = json.loads(lists["val"].read_text())
    entries[1]["target_points"] = [[10_000, 5]] + entries[1]["target_points"][1:]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entries))
    dm = _dm(root, pair_lists={"val": str(bad)}, check=False)  # the load-time check
    dm.setup("validate")
    dm.datasets["val"][0]
    with pytest.raises(DataError, match=f"{bad} entry 1: trg keypoints .* lie outside"):
        dm.datasets["val"][1]
    with pytest.raises(DataError, match=f"pair list {tmp_path / 'none.json'} not found"):
        _dm(root, pair_lists={"val": str(tmp_path / "none.json")}).split_pairs("val")
    with pytest.raises(ValueError, match="pair_lists has splits"):
        _dm(root, pair_lists={"trn": str(bad)})


def test_difficulty_levels_come_from_the_official_annotations(spair, spair_copy):
    """SPair's per-pair viewpoint_variation, scale_variation, truncation and occlusion (the keys
    HPF reads, juhongm999/hpf data/spair.py L35-38) reach each item under PCK's flag names;
    DHF lists carry none, and a file without them is read as before."""
    root, lists = spair
    dm = _dm(root)
    dm.setup("test")
    keys = {"viewpoint_variation": "vp_var", "scale_variation": "sc_var", "truncation": "truncn", "occlusion": "occln"}
    for index, pair in enumerate(dm.datasets["test"].pairs):
        ann = json.loads(Path(pair.source).read_text())
        expected = {flag: ann[key] for key, flag in keys.items()}
        assert pair.difficulty == expected and dm.datasets["test"][index]["difficulty"] == expected
    batch = next(iter(dm.test_dataloader()))
    assert batch["difficulty"] == [dm.datasets["test"].pairs[0].difficulty]
    assert all(p.difficulty is None for p in _dm(root, pair_lists={"val": str(lists["val"])}).split_pairs("val"))
    _edit(spair_copy, lambda a: [a.pop(key) for key in keys])
    first = _dm(spair_copy).split_pairs("val")[0]
    assert first.difficulty is None
