"""PCK on hand-computed pairs, and merged halves against one metric (the DDP sync stand-in)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.utilities.data import dim_zero_sum

from csdiff.metrics import PCK
from csdiff.metrics.pck import DIFFICULTY_LEVELS, format_pck_table

FOUR = ("pck_img_point", "pck_img_image", "pck_bbox_point", "pck_bbox_image")


def _pair(offsets: list[tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """gt at arbitrary positions, pred = gt + offset, so each distance is known by hand."""
    gt = torch.arange(2 * len(offsets), dtype=torch.float32).reshape(-1, 2) * 7 + 30
    return gt + torch.tensor(offsets, dtype=torch.float32), gt


def _update(metric: PCK, offsets, image_size, bbox, category=None) -> None:
    pred, gt = _pair(offsets)
    metric.update(pred, gt, image_size, bbox, category)


def test_per_point_and_per_image_differ() -> None:
    metric = PCK()  # alpha 0.1 on a 100 x 100 image and box: threshold 10 for both
    _update(metric, [(3, 0)], (100, 100), (0, 0, 100, 100))  # 1 of 1 correct
    _update(metric, [(0, 0), (20, 0), (0, 50)], (100, 100), (0, 0, 100, 100))  # 1 of 3
    results = metric.compute()
    for threshold in ("img", "bbox"):
        assert results[f"pck_{threshold}_point"].item() == pytest.approx(2 / 4)
        assert results[f"pck_{threshold}_image"].item() == pytest.approx((1 + 1 / 3) / 2)
    assert results["pairs"].item() == 2
    assert all(results[key].ndim == 0 and results[key].is_floating_point() for key in FOUR)


def test_image_and_bbox_thresholds_differ() -> None:
    metric = PCK()
    # image (H, W) = (50, 200): 0.1 * max = 20; bbox 50 wide, 30 high: 0.1 * 50 = 5
    _update(metric, [(4, 0), (0, 15), (30, 0)], (50, 200), (10, 20, 60, 50))
    results = metric.compute()
    assert results["pck_img_point"].item() == pytest.approx(2 / 3)
    assert results["pck_bbox_point"].item() == pytest.approx(1 / 3)
    assert results["pck_img_image"].item() == pytest.approx(2 / 3)
    assert results["pck_bbox_image"].item() == pytest.approx(1 / 3)


def test_distance_equal_to_threshold_is_correct() -> None:
    metric = PCK(alphas=(0.25,))  # threshold 0.25 * 20 = 5 for image and box
    _update(metric, [(3, 4), (-4, -3), (3, 4.01)], (20, 20), (0, 0, 20, 8))
    results = metric.compute()
    assert results["pck_img_point"].item() == pytest.approx(2 / 3)
    assert results["pck_bbox_point"].item() == pytest.approx(2 / 3)


def test_several_alphas() -> None:
    metric = PCK(alphas=(0.05, 0.1, 0.2))  # thresholds 5, 10, 20
    _update(metric, [(4, 0), (0, 8), (16, 0), (0, 40)], (100, 80), (0, 0, 100, 100))
    results = metric.compute()
    expected = {0.05: 0.25, 0.1: 0.5, 0.2: 0.75}
    assert set(results) == {
        *FOUR,
        *(f"{k}@{a}" for k in FOUR for a in expected),
        "pairs",
        "per_category",
        "per_difficulty",
    }
    for alpha, value in expected.items():
        for key in FOUR:
            assert results[f"{key}@{alpha}"].item() == pytest.approx(value)
    for key in FOUR:  # unsuffixed keys are the first alpha
        assert results[key].item() == pytest.approx(0.25)


def test_per_category() -> None:
    metric = PCK(categories=("cat", "dog", "bus"))
    _update(metric, [(3, 0)], (100, 100), (0, 0, 100, 100), "cat")
    _update(metric, [(0, 0), (20, 0), (0, 50)], (100, 100), (0, 0, 100, 100), "dog")
    _update(metric, [(50, 0)], (100, 100), (0, 0, 100, 100))  # no category: only in "all"
    results = metric.compute()
    per_category = results["per_category"]
    assert list(per_category) == ["cat", "dog"]  # bus unseen
    assert per_category["cat"] == {**dict.fromkeys(FOUR, 1.0), "pairs": 1}
    assert per_category["dog"]["pairs"] == 1
    for key in FOUR:
        assert per_category["dog"][key] == pytest.approx(1 / 3)
    assert results["pck_img_point"].item() == pytest.approx(2 / 5)
    assert results["pck_img_image"].item() == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert results["pairs"].item() == 3


def test_without_categories_keeps_no_per_category_results() -> None:
    metric = PCK()
    _update(metric, [(0, 0)], (10, 10), (0, 0, 5, 5), "cat")  # category ignored, not an error
    assert metric.compute()["per_category"] == {}


def test_reset_starts_over() -> None:
    metric = PCK(categories=("cat",))
    _update(metric, [(50, 0)], (100, 100), (0, 0, 100, 100), "cat")
    metric.reset()
    _update(metric, [(0, 0)], (100, 100), (0, 0, 100, 100), "cat")
    results = metric.compute()
    assert results["pck_img_point"].item() == 1.0
    assert results["pairs"].item() == 1
    assert results["per_category"]["cat"]["pairs"] == 1


def test_errors() -> None:
    metric = PCK(categories=("cat", "dog"))
    empty = torch.zeros(0, 2)
    with pytest.raises(ValueError, match="no keypoints"):
        metric.update(empty, empty, (10, 10), (0, 0, 5, 5))
    pred, gt = _pair([(0, 0)])
    with pytest.raises(ValueError, match=r"unknown category 'bus'; valid: \['cat', 'dog'\]"):
        metric.update(pred, gt, (10, 10), (0, 0, 5, 5), "bus")
    with pytest.raises(ValueError, match=r"must both be \(N, 2\)"):
        metric.update(pred, gt[:, :1], (10, 10), (0, 0, 5, 5))
    with pytest.raises(ValueError, match="bbox must have 4 numbers"):
        metric.update(pred, gt, (10, 10), (0, 0, 5))
    with pytest.raises(ValueError, match="x2 >= x1"):
        metric.update(pred, gt, (10, 10), (5, 0, 0, 5))
    with pytest.raises(ValueError, match="alphas"):
        PCK(alphas=())
    assert int(metric.pairs[0]) == 0  # failed updates leave no trace


def _reference(pairs: list[tuple], alpha: float) -> dict[str, float]:
    """Straight numpy PCK over (pred, gt, image_size, bbox) tuples."""
    hits = {"img": [], "bbox": []}
    for pred, gt, (h, w), (x1, y1, x2, y2) in pairs:
        dist = np.linalg.norm(pred - gt, axis=1)
        hits["img"].append(dist <= alpha * max(h, w))
        hits["bbox"].append(dist <= alpha * max(y2 - y1, x2 - x1))
    out = {}
    for kind, per_pair in hits.items():
        out[f"pck_{kind}_point"] = np.concatenate(per_pair).mean()
        out[f"pck_{kind}_image"] = np.mean([h.mean() for h in per_pair])
    return out


def test_merged_halves_equal_one_metric_and_numpy() -> None:
    rng = np.random.default_rng(0)
    names = ("cat", "dog", "bus")
    pairs, categories = [], []
    for _ in range(20):
        n = int(rng.integers(1, 8))
        h, w = (float(v) for v in rng.integers(100, 500, size=2))
        x1, y1 = rng.uniform(0, 50, size=2)
        bbox = (x1, y1, x1 + rng.uniform(50, 150), y1 + rng.uniform(50, 150))
        gt = rng.uniform(0, 100, size=(n, 2))
        pairs.append((gt + rng.normal(0, 12, size=(n, 2)), gt, (h, w), bbox))
        categories.append(names[int(rng.integers(0, 3))])

    def fed(indices: range) -> PCK:
        metric = PCK(alphas=(0.1, 0.05), categories=names)
        for i in indices:
            pred, gt, size, bbox = pairs[i]
            metric.update(torch.from_numpy(pred), torch.from_numpy(gt), size, bbox, categories[i])
        return metric

    assert all(fn is dim_zero_sum for fn in fed(range(0))._reductions.values())
    whole, merged = fed(range(20)), fed(range(9))
    merged.merge_state(fed(range(9, 20)))
    expected, got = whole.compute(), merged.compute()
    for key, value in expected.items():
        if key not in ("per_category", "per_difficulty"):
            assert got[key].item() == pytest.approx(value.item(), abs=1e-6), key
    assert list(got["per_category"]) == list(expected["per_category"]) == list(names)
    for name, values in expected["per_category"].items():
        assert got["per_category"][name] == pytest.approx(values)

    for alpha in (0.1, 0.05):
        for key, value in _reference(pairs, alpha).items():
            assert expected[f"{key}@{alpha}"].item() == pytest.approx(value, abs=1e-6)
    cats = [p for p, c in zip(pairs, categories) if c == "dog"]
    for key, value in _reference(cats, 0.1).items():
        assert expected["per_category"]["dog"][key] == pytest.approx(value)


def test_format_table_labels_every_number() -> None:
    metric = PCK(categories=("aeroplane", "dog"))
    _update(metric, [(3, 0)], (100, 100), (0, 0, 100, 100), "aeroplane")
    _update(metric, [(0, 0), (20, 0), (0, 50)], (100, 100), (0, 0, 100, 100), "aeroplane")
    table = format_pck_table(metric.compute(), alpha=0.1)
    lines = table.splitlines()
    assert lines[0] == "PCK@0.1 (%)"
    assert lines[1].split() == ["category", "img/point", "img/image", "bbox/point", "bbox/image", "pairs"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned
    assert lines[3].split() == ["aeroplane", "50.00", "66.67", "50.00", "66.67", "2"]
    assert lines[-1].split() == ["all", "50.00", "66.67", "50.00", "66.67", "2"]
    assert not any("dog" in line for line in lines)

    nothing = {**dict.fromkeys(FOUR, torch.tensor(math.nan)), "pairs": torch.tensor(0.0), "per_category": {}}
    empty = format_pck_table(nothing)
    assert empty.splitlines()[-1].split() == ["all", "n/a", "n/a", "n/a", "n/a", "0"]


def test_per_difficulty_rows_equal_a_per_level_reference_and_merge_like_ddp() -> None:
    """SPair's four difficulty annotations (HPF, juhongm999/hpf data/spair.py L35-38, reads them as
    vpvar, scvar, trncn, occln) split the pairs into levels; each level's PCK is what HPF's
    evaluator computes for that set of pairs (model/evaluation.py L49-59: a pair's PCK is
    correct / N, averaged over pairs), and the pooled per-point number, by hand in numpy."""
    rng = np.random.default_rng(1)
    pairs, flags = [], []
    for _ in range(40):
        n = int(rng.integers(1, 8))
        gt = rng.uniform(0, 100, size=(n, 2))
        pairs.append((gt + rng.normal(0, 15, size=(n, 2)), gt, (200.0, 300.0), (10.0, 20.0, 130.0, 110.0)))
        flags.append({flag: int(rng.integers(0, len(names))) for flag, names in DIFFICULTY_LEVELS.items()})

    def fed(indices) -> PCK:
        metric = PCK(categories=("cat",))
        for i in indices:
            pred, gt, size, bbox = pairs[i]
            metric.update(torch.from_numpy(pred), torch.from_numpy(gt), size, bbox, "cat", flags[i])
        return metric

    results = fed(range(40)).compute()
    assert list(results["per_difficulty"]) == list(DIFFICULTY_LEVELS)
    for flag, names in DIFFICULTY_LEVELS.items():
        for level, name in enumerate(names):
            chosen = [p for p, f in zip(pairs, flags) if f[flag] == level]
            if not chosen:
                assert name not in results["per_difficulty"][flag]
                continue
            row = results["per_difficulty"][flag][name]
            assert row["pairs"] == len(chosen)
            for key, value in _reference(chosen, 0.1).items():
                assert row[key] == pytest.approx(value), (flag, name, key)
    merged = fed(range(15))
    merged.merge_state(fed(range(15, 40)))
    got = merged.compute()["per_difficulty"]
    for flag, levels in results["per_difficulty"].items():
        for name, row in levels.items():
            assert got[flag][name] == pytest.approx(row), (flag, name)
    assert results["per_category"]["cat"]["pairs"] == 40 and results["pairs"].item() == 40  # levels add rows, not pairs

    table = format_pck_table(results, alpha=0.1).splitlines()
    assert len({len(line) for line in table[1:]}) == 1  # aligned
    level_rows = [line.split() for line in table if line.split()[0] in DIFFICULTY_LEVELS]
    assert len(level_rows) == sum(len(levels) for levels in results["per_difficulty"].values())
    hard = results["per_difficulty"]["vp_var"]["hard"]
    assert ["vp_var", "hard", *(f"{100 * hard[k]:.2f}" for k in FOUR), str(hard["pairs"])] in level_rows

    pred, gt = _pair([(0, 0)])
    metric = PCK()
    with pytest.raises(ValueError, match=r"unknown difficulty truncn=4; valid: levels 0..3"):
        metric.update(pred, gt, (10, 10), (0, 0, 5, 5), difficulty={"truncn": 4})
    with pytest.raises(ValueError, match="unknown difficulty pose"):
        metric.update(pred, gt, (10, 10), (0, 0, 5, 5), difficulty={"pose": 0})
    assert int(metric.pairs[0]) == 0
