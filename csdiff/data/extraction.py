"""The images ``csdiff extract`` writes features of: (output name, image file) pairs, read whole."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from csdiff.data.reading import read_image
from csdiff.data.transforms import to_tensor


class ExtractionDataset(Dataset):
    """Each item: the image in [-1, 1] at its stored size, its output name and its path.

    Images keep their own sizes (the extractor resizes each to ``img_size``), so batches are
    lists, see :func:`collate_extraction`.
    """

    def __init__(self, items: Sequence[tuple[str, str]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, path = self.items[index]
        return {"image": to_tensor(read_image(path)), "name": name, "path": path}


def collate_extraction(batch: list[dict[str, Any]]) -> dict[str, list]:
    return {key: [item[key] for item in batch] for key in batch[0]}
