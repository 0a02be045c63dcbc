"""The up-front data check: every item of the splits a run will use, before its first step.

Without it, a bad file surfaces only when its item is loaded: a validation label after the
first training epoch (with the paper configs, 8,000 steps, hours in). Each datamodule's
``setup`` runs its datasets' own per-item checks here (the very code that loading runs, so
the messages are the same), in a thread pool: decoding releases the GIL, so threads scale.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from tqdm import tqdm

from csdiff.data.reading import DataError
from csdiff.data.samplers import process_group

T = TypeVar("T")
R = TypeVar("R")
# Files named after the first bad one in the error line (the first's message is given in full).
NAMED_AFTER_FIRST = 3


def check_threads(num_workers: int) -> int:
    """Threads for the check: the datamodule's ``num_workers``, else the CPUs this process may use."""
    if num_workers > 0:
        return num_workers
    if hasattr(os, "sched_getaffinity"):  # a cluster job's share, not the whole node
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def _outcome(check: Callable[[T], R], item: T) -> tuple[R | None, DataError | None]:
    try:
        return check(item), None
    except DataError as err:
        return None, err


def check_items(
    items: Sequence[T],
    check: Callable[[T], R],
    names: Sequence[str],
    what: str,
    num_workers: int = 0,
) -> list[R]:
    """``check(item)`` for every item, in threads, with a progress bar; the results in item order.

    Every item is checked (a bad file costs no more time than a good one, and the count tells
    a wrong encoding, where every label fails, from a few damaged files). Then one DataError
    is raised if any failed: the first failure's own message, the number of others and the
    ``names`` of the next few. ``what`` names the items in the bar and the message ("val
    labels"). The bar shows on a terminal only, and only on rank 0 under DDP, where every
    rank runs the same check and so stops with the same error.
    """
    if not items:
        return []
    _, rank = process_group()
    bar = tqdm(total=len(items), desc=f"checking {what}", unit="file", disable=None if rank == 0 else True, leave=False)
    results: list[R | None] = []
    failed: list[tuple[int, DataError]] = []
    with bar, ThreadPoolExecutor(max_workers=min(check_threads(num_workers), len(items))) as pool:
        for index, (result, error) in enumerate(pool.map(lambda item: _outcome(check, item), items)):
            results.append(result)
            if error is not None:
                failed.append((index, error))
            bar.update()
    if failed:
        raise DataError(_summary(failed, names, len(items), what))
    return results  # type: ignore[return-value]


def _summary(failed: list[tuple[int, DataError]], names: Sequence[str], total: int, what: str) -> str:
    """The first failure's message, then how many more failed and which (a few)."""
    first = str(failed[0][1])
    if len(failed) == 1:
        return first
    others = [names[index] for index, _ in failed[1 : 1 + NAMED_AFTER_FIRST]]
    etc = ", ..." if len(failed) - 1 > NAMED_AFTER_FIRST else ""
    return f"{first} [{len(failed) - 1} more of the {total} {what} fail the check too: {', '.join(others)}{etc}]"


def orphan_error(orphans: Sequence[tuple[str, str]]) -> DataError:
    """The error for label files without their image, given as (label file, the image it
    lacks): the first one in full, then how many more and which (a few)."""
    label, image = orphans[0]
    message = f"label file {label} has no image (expected {image}); restore the image or remove the label"
    if len(orphans) > 1:
        others = [other for other, _ in orphans[1 : 1 + NAMED_AFTER_FIRST]]
        etc = ", ..." if len(orphans) - 1 > NAMED_AFTER_FIRST else ""
        message += f" [{len(orphans) - 1} more label files have no image: {', '.join(others)}{etc}]"
    return DataError(message)
