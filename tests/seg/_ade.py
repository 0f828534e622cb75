"""A tiny ADE20K-layout folder of generated shapes with their label maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = np.array([(120, 120, 120), (220, 40, 40), (40, 200, 40), (40, 40, 220)])


def make_ade(root: Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (24, 32), seed: int = 0) -> Path:
    """Images of a rectangle (label 1), a disc (label 2) and a stripe (label 3) on background 0 (ignored)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    for split, n in (('training', n_train), ('validation', n_val)):
        (root / 'images' / split).mkdir(parents=True, exist_ok=True)
        (root / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = np.zeros((h, w), np.uint8)
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            label[y0:y0 + h // 3, x0:x0 + w // 3] = 1
            cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < (h // 5) ** 2] = 2
            label[:, rng.integers(0, w - 3):][:, :3] = 3
            img = np.clip(COLOURS[label] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / 'images' / split / f'img_{i}.jpg', quality=95)
            Image.fromarray(label, mode='L').save(root / 'annotations' / split / f'img_{i}.png')
    return root
