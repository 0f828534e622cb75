"""ImageNet-layout folders (``<root>/<split>/<class>/*.jpg``) with clear errors on bad layouts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torchvision.datasets import ImageFolder


def checked_image_folder(
        root: str | Path,
        split: str,
        transform: Callable | None = None,
        classes: list[str] | None = None,
) -> ImageFolder:
    """``torchvision.datasets.ImageFolder`` of ``root/split`` that checks the layout first.

    Args:
        root: the dataset folder, holding one folder per split.
        split: ``'train'``, ``'val'``, ...
        transform: image transform.
        classes: the class names the split must have (those of the training split), or None.

    Raises:
        FileNotFoundError: ``root`` or ``root/split`` does not exist, or a class folder holds no image.
        ValueError: the split's classes differ from ``classes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'data_dir {str(root)!r} is not a directory')
    folder = root / split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f'split folder {str(folder)!r} not found; {root} has: {found or "no folders"}')
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not found:
        raise FileNotFoundError(f'{folder} has no class folders (expected {folder}/<class>/<image>)')
    if classes is not None and found != list(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise ValueError(
            f'the classes of {folder} differ from the training classes: missing {missing}, unexpected {extra}')
    try:
        return ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as e:
        raise FileNotFoundError(f'{folder}: {e}') from None
