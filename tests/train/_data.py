"""Tiny generated datasets for the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ((220, 30, 30), (30, 200, 30), (30, 30, 220))


def make_image_folder(root: Path, n_train: int = 8, n_val: int = 4, size: int = 16, seed: int = 0) -> Path:
    """``root/{train,val}/<class>/*.png``: one class per colour, with noise."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('val', n_val)):
        for c, colour in enumerate(COLOURS):
            d = root / split / f'class{c}'
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f'{i}.png')
    return root
