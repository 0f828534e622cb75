"""The UCI handwritten digits, shipped with visattn for the demo of ``train.py``.

``digits.csv.gz`` is the test set of "Optical Recognition of Handwritten Digits" (E. Alpaydin, C. Kaynak,
UCI Machine Learning Repository, 1998, https://doi.org/10.24432/C50P49), licensed CC BY 4.0, in the copy
that scikit-learn ships as ``sklearn/datasets/data/digits.csv.gz``: 1,797 rows of 64 pixel counts
(8×8, values 0-16) followed by the label 0-9.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

DIGITS_PATH = Path(__file__).with_name('digits.csv.gz')
NUM_CLASSES = 10
SPLITS = ('train', 'val')


def load_digits(path: str | Path = DIGITS_PATH) -> tuple[Tensor, Tensor]:
    """All 1,797 digits.

    Returns:
        images: [1797, 1, 8, 8] float32 in [0, 1] (pixel counts / 16); labels: [1797] int64 in 0-9.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'digits file not found: {path}')
    with gzip.open(path, 'rt') as f:
        rows = [[int(v) for v in line.split(',')] for line in f if line.strip()]
    data = torch.tensor(rows, dtype=torch.int64)
    if data.shape[1] != 65:
        raise ValueError(f'{path}: expected 65 columns (64 pixels + label), got {data.shape[1]}')
    return data[:, :64].reshape(-1, 1, 8, 8).float() / 16, data[:, 64]


class DigitsDataset(Dataset):
    """One split of the digits: a fixed, stratified ``val_fraction`` of each class is the validation set.

    Args:
        split: ``'train'`` or ``'val'``.
        transform: applied to each [1, 8, 8] image tensor (after normalisation).
        val_fraction: share of each class held out for validation (default 0.2).
        seed: seed of the split (default 0; the same seed gives the same split everywhere).

    Items:
        (image [1, 8, 8] float32, normalised with the mean and std of the training split; label int).
    """

    def __init__(
            self,
            split: str = 'train',
            transform: Callable[[Tensor], Tensor] | None = None,
            val_fraction: float = 0.2,
            seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        if not 0 < val_fraction < 1:
            raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}')
        images, labels = load_digits()
        gen = torch.Generator().manual_seed(seed)
        is_val = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(NUM_CLASSES):
            idx = (labels == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            is_val[idx[:round(len(idx) * val_fraction)]] = True
        train = images[~is_val]
        self.mean, self.std = train.mean().item(), train.std().item()
        keep = is_val if split == 'val' else ~is_val
        self.images = (images[keep] - self.mean) / self.std
        self.labels = labels[keep]
        self.transform = transform
        self.classes = [str(c) for c in range(NUM_CLASSES)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])
