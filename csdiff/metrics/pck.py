"""PCK for semantic correspondence, all four variants that papers report, labelled.

Papers call different numbers "PCK@0.1": the threshold is α·max(H, W) of the target image
("img") or α·max of the target bbox height and width ("bbox"), and the fraction is taken
over all keypoints pooled ("point") or per pair and then averaged ("image"). csdiff keeps
all four so results are comparable with whichever one a paper used.

SPair-71k also annotates each pair's difficulty (viewpoint and scale variation, truncation,
occlusion); PCK per level of each shows where a method fails, beyond the references' totals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

_THRESHOLDS = ("img", "bbox")
_POOLINGS = ("point", "image")
_KEYS = tuple(f"pck_{threshold}_{pooling}" for threshold in _THRESHOLDS for pooling in _POOLINGS)
# SPair-71k's per-pair difficulty annotations (viewpoint_variation, scale_variation, truncation,
# occlusion; HPF reads them as vpvar, scvar, trncn, occln): the name of each level, by value.
DIFFICULTY_LEVELS: dict[str, tuple[str, ...]] = {
    "vp_var": ("easy", "medium", "hard"),
    "sc_var": ("easy", "medium", "hard"),
    "truncn": ("none", "source", "target", "both"),
    "occln": ("none", "source", "target", "both"),
}


class PCK(Metric):
    """Percentage of correct keypoints, one image pair per ``update``.

    A predicted keypoint is correct when its Euclidean distance to the ground truth is
    ``<=`` the threshold: α·max(H, W) of the target image (``img``) or α·max(bbox height,
    bbox width) of the target object (``bbox``). ``point`` pools all keypoints of all pairs;
    ``image`` takes the fraction per pair and averages over pairs.

    Every state is a sum (``dist_reduce_fx="sum"``), so the DDP sync is exact. States are
    indexed by group (0 = all pairs, 1 + k = ``categories[k]``, then one per difficulty level
    of :data:`DIFFICULTY_LEVELS`), threshold (img, bbox) and alpha.

    ``compute()`` returns a dict of 0-dim float tensors: ``pck_img_point``, ``pck_img_image``,
    ``pck_bbox_point``, ``pck_bbox_image`` for the first alpha; the same keys suffixed
    ``@{alpha}`` for every alpha (e.g. ``pck_bbox_point@0.05``); ``pairs`` (number of pairs
    scored); and ``per_category``: ``{category: {the four unsuffixed keys: float, "pairs":
    int}}`` as plain Python numbers (for printing, not logging), for the categories seen, in
    the order of ``categories`` (empty when ``categories`` is None); ``per_difficulty``:
    ``{flag: {level name: the same}}`` for the levels of :data:`DIFFICULTY_LEVELS` seen (empty
    when no pair had difficulty annotations). With no pairs, the PCK values are NaN.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, alphas: Sequence[float] = (0.1,), categories: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        alphas = tuple(float(alpha) for alpha in alphas)
        if not alphas or any(not alpha > 0 for alpha in alphas):
            raise ValueError(f"alphas must be a non-empty sequence of positive numbers, got {alphas}")
        if len(set(alphas)) != len(alphas):
            raise ValueError(f"alphas has duplicates: {alphas}")
        if categories is not None:
            categories = tuple(categories)
            if not categories:
                raise ValueError("categories is empty; pass None to keep no per-category results")
            if len(set(categories)) != len(categories):
                raise ValueError(f"categories has duplicates: {categories}")
        self.alphas = alphas
        self.categories = categories
        self._category_index = {name: 1 + k for k, name in enumerate(categories or ())}
        levels = [(flag, level) for flag, names in DIFFICULTY_LEVELS.items() for level in range(len(names))]
        self._difficulty_index = {key: 1 + len(self._category_index) + k for k, key in enumerate(levels)}
        groups, num_alphas = 1 + len(self._category_index) + len(levels), len(alphas)
        shape = (groups, len(_THRESHOLDS), num_alphas)
        # Counts are exact integers; per-pair fractions are summed in float64 so that the sum
        # over thousands of pairs does not drift.
        self.add_state("correct", default=torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("fraction_sum", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("points", default=torch.zeros(groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("pairs", default=torch.zeros(groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        pred: Tensor,
        gt: Tensor,
        image_size: Sequence[float] | Tensor,
        bbox: Sequence[float] | Tensor,
        category: str | None = None,
        difficulty: Mapping[str, int] | None = None,
    ) -> None:
        """Scores one pair: ``pred``/``gt`` (N, 2) as (x, y) in original target-image pixels,
        ``image_size`` (H, W) and ``bbox`` (x1, y1, x2, y2) of the target image.

        ``category`` must be one of ``categories``; it is ignored when ``categories`` is None.
        ``difficulty`` maps flags of :data:`DIFFICULTY_LEVELS` to the pair's level (0-based),
        e.g. ``{"vp_var": 2, "occln": 0}``; the pair then counts in those levels' rows too.
        """
        if pred.ndim != 2 or pred.shape[-1] != 2 or pred.shape != gt.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must both be (N, 2)")
        if pred.shape[0] == 0:
            raise ValueError("pair has no keypoints (N == 0): PCK of an empty pair is undefined; skip it")
        groups = [0]
        if self.categories is not None and category is not None:
            if category not in self._category_index:
                raise ValueError(f"unknown category {category!r}; valid: {list(self.categories)}")
            groups.append(self._category_index[category])
        for flag, level in (difficulty or {}).items():
            if (flag, level) not in self._difficulty_index:
                names = DIFFICULTY_LEVELS.get(flag)
                valid = f"levels 0..{len(names) - 1}" if names else f"flags {list(DIFFICULTY_LEVELS)}"
                raise ValueError(f"unknown difficulty {flag}={level!r}; valid: {valid}")
            groups.append(self._difficulty_index[(flag, level)])
        height, width = _floats(image_size, "image_size", 2)
        if not (height > 0 and width > 0):
            raise ValueError(f"image_size must be (H, W) with positive sides, got {(height, width)}")
        x1, y1, x2, y2 = _floats(bbox, "bbox", 4)
        if not (x2 >= x1 and y2 >= y1 and max(x2 - x1, y2 - y1) > 0):
            raise ValueError(f"bbox must be (x1, y1, x2, y2) with x2 >= x1, y2 >= y1, got {(x1, y1, x2, y2)}")

        device = self.correct.device
        alphas = torch.tensor(self.alphas, dtype=torch.float64, device=device)
        sides = torch.tensor([max(height, width), max(y2 - y1, x2 - x1)], dtype=torch.float64, device=device)
        thresholds = sides[:, None] * alphas  # (threshold kind, alpha)
        distance = torch.linalg.vector_norm(
            pred.to(device=device, dtype=torch.float64) - gt.to(device=device, dtype=torch.float64), dim=-1
        )
        correct = (distance[:, None, None] <= thresholds).sum(dim=0)  # (threshold kind, alpha)
        num_points = pred.shape[0]
        for group in groups:
            self.correct[group] += correct
            self.fraction_sum[group] += correct.double() / num_points
            self.points[group] += num_points
            self.pairs[group] += 1

    def compute(self) -> dict[str, Any]:
        points, pairs = self.points.double()[:, None, None], self.pairs.double()[:, None, None]
        # 0 / 0 gives NaN for groups without pairs.
        pooled = {"point": self.correct.double() / points, "image": self.fraction_sum / pairs}

        def four(group: int, alpha: int) -> dict[str, Tensor]:
            return {
                f"pck_{threshold}_{pooling}": pooled[pooling][group, t, alpha]
                for t, threshold in enumerate(_THRESHOLDS)
                for pooling in _POOLINGS
            }

        results: dict[str, Any] = {key: value.float() for key, value in four(0, 0).items()}
        for a, alpha in enumerate(self.alphas):
            results.update({f"{key}@{alpha}": value.float() for key, value in four(0, a).items()})
        results["pairs"] = self.pairs[0].float()
        results["per_category"] = {
            name: {**{key: value.item() for key, value in four(group, 0).items()}, "pairs": int(self.pairs[group])}
            for name, group in self._category_index.items()
            if self.pairs[group] > 0
        }
        per_difficulty: dict[str, dict[str, dict[str, float]]] = {}
        for (flag, level), group in self._difficulty_index.items():
            if self.pairs[group] > 0:
                values = {key: value.item() for key, value in four(group, 0).items()}
                per_difficulty.setdefault(flag, {})[DIFFICULTY_LEVELS[flag][level]] = {
                    **values,
                    "pairs": int(self.pairs[group]),
                }
        results["per_difficulty"] = per_difficulty
        return results


def _floats(values: Sequence[float] | Tensor, name: str, count: int) -> list[float]:
    """Boxes and sizes arrive as lists or (possibly batched-by-one) tensors; check the count here
    rather than fail on unpacking."""
    flat = [float(v) for v in torch.as_tensor(values).reshape(-1).tolist()]
    if len(flat) != count:
        raise ValueError(f"{name} must have {count} numbers, got {len(flat)}")
    return flat


def format_pck_table(results: Mapping[str, Any], alpha: float | None = None) -> str:
    """PCK results of :class:`PCK` as an aligned text table (percent), one row per category
    seen, one for all pairs and one per difficulty level seen (``vp_var hard``), each of the
    four variants in its own labelled column.

    Pass the metric's first alpha as ``alpha`` to name the threshold in the title.
    """
    labels = ("img/point", "img/image", "bbox/point", "bbox/image")
    category_rows = [(name, values, values["pairs"]) for name, values in results["per_category"].items()]
    difficulty_rows = [
        (f"{flag} {level}", values, values["pairs"])
        for flag, levels in results.get("per_difficulty", {}).items()
        for level, values in levels.items()
    ]
    all_row = ("all", results, int(results["pairs"]))
    rows = [*category_rows, *difficulty_rows, all_row]
    width = max(len("category"), *(len(name) for name, _, _ in rows))
    pairs_width = max(len("pairs"), *(len(str(pairs)) for _, _, pairs in rows))

    def line(name: str, cells: Sequence[str], pairs: object) -> str:
        body = "  ".join(f"{cell:>{len(label)}}" for cell, label in zip(cells, labels))
        return f"{name:<{width}}  {body}  {pairs!s:>{pairs_width}}"

    def row(name: str, values: Mapping[str, Any], pairs: int) -> str:
        numbers = [float(values[key]) for key in _KEYS]
        return line(name, ["n/a" if math.isnan(v) else f"{100 * v:.2f}" for v in numbers], pairs)

    rule = line("-" * width, ["-" * len(label) for label in labels], "-" * pairs_width)
    lines = [f"PCK@{alpha} (%)" if alpha is not None else "PCK (%)", line("category", labels, "pairs"), rule]
    lines += [row(*category) for category in category_rows]
    if category_rows:
        lines.append(rule)
    lines.append(row(*all_row))
    if difficulty_rows:
        lines.append(rule)
        lines += [row(*difficulty) for difficulty in difficulty_rows]
    return "\n".join(lines)
