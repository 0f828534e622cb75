"""The loss and accuracy curves of a run as a PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd')


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, xs: list[float],
           series: dict[str, list[float]]) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline='black')
    draw.text((x0 + 4, y0 - 14), title, fill='black')
    values = [v for vs in series.values() for v in vs if v == v]
    if not values or not xs:
        return
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1
    xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    draw.text((x0 - 44, y0), f'{hi:.3g}', fill='black')
    draw.text((x0 - 44, y1 - 10), f'{lo:.3g}', fill='black')
    draw.text((x0, y1 + 4), f'{xlo:g}', fill='black')
    draw.text((x1 - 24, y1 + 4), f'{xhi:g}', fill='black')

    def point(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0)

    for i, (name, vs) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = [point(x, v) for x, v in zip(xs, vs) if v == v]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        draw.text((x1 - 110, y0 + (y1 - y0) // 2 + 12 * i), name, fill=colour)


def plot_summary(csv_path: str | Path, png_path: str | Path, metric: str = 'eval_top1') -> None:
    """Draw ``train_loss``/``eval_loss`` and ``metric`` against ``epoch`` from a ``summary.csv``."""
    with open(csv_path, newline='') as f:
        rows = list(csv.DictReader(f))
    xs = [float(r['epoch']) + 1 for r in rows]

    def col(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) not in (None, '') else float('nan') for r in rows]

    img = Image.new('RGB', (900, 360), 'white')
    draw = ImageDraw.Draw(img)
    _panel(draw, (60, 30, 430, 320), 'loss', xs, {k: col(k) for k in ('train_loss', 'eval_loss') if k in rows[0]})
    metrics = [k for k in (metric, f'ema_{metric}') if rows and k in rows[0]]
    _panel(draw, (510, 30, 880, 320), metric, xs, {k: col(k) for k in metrics})
    draw.text((440, 340), 'epoch', fill='black')
    img.save(png_path)
