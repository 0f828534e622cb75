"""ADE20K (``ADEChallengeData2016``) and the joint image/label transforms of the common recipe.

Layout: ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png`` with the same
file stems; label 0 is "other" and is ignored, labels 1-150 become classes 0-149 ("ADE20K", "Scene Parsing
through ADE20K Dataset", Zhou et al., CVPR 2017; the reduce-zero-label convention of mmsegmentation).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


def _resize(img: Tensor, label: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    img = F.interpolate(img[None], size=size, mode='bilinear', align_corners=False)[0]
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size, mode='nearest')[0, 0].long()
    return img, label


def _scaled_size(h: int, w: int, short: float, long: float) -> tuple[int, int]:
    """Size keeping the aspect ratio so that the short side is <= ``short`` and the long side <= ``long``."""
    f = min(long / max(h, w), short / min(h, w))
    return max(1, round(h * f)), max(1, round(w * f))


class SegTrainTransform:
    """Random rescale (``scale_range`` × the (4·crop, crop) scale, aspect kept), pad, random ``crop_size``
    crop, horizontal flip, normalisation. Draws from torch's global RNG.

    Call: (image [3, H, W] uint8, label [H, W] int64) -> (image [3, crop, crop] float, label [crop, crop]).
    """

    def __init__(self, crop_size: int = 512, scale_range: tuple[float, float] = (0.5, 2.0), hflip: float = 0.5,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 ignore_index: int = 255) -> None:
        if crop_size < 1:
            raise ValueError(f'crop_size must be >= 1, got {crop_size}')
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f'scale_range must be (low, high) with 0 < low <= high, got {scale_range}')
        self.crop, self.scale_range, self.hflip, self.ignore_index = crop_size, tuple(scale_range), hflip, ignore_index
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, img: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = self.scale_range
        s = lo + (hi - lo) * torch.rand(()).item()
        img = (img.float() / 255 - self.mean) / self.std
        img, label = _resize(img, label, _scaled_size(*img.shape[-2:], self.crop * s, 4 * self.crop * s))
        h, w = img.shape[-2:]
        ph, pw = max(self.crop - h, 0), max(self.crop - w, 0)
        if ph or pw:
            img = F.pad(img, (0, pw, 0, ph))
            label = F.pad(label, (0, pw, 0, ph), value=self.ignore_index)
        h, w = img.shape[-2:]
        top = int(torch.randint(0, h - self.crop + 1, ()))
        left = int(torch.randint(0, w - self.crop + 1, ()))
        img = img[:, top:top + self.crop, left:left + self.crop]
        label = label[top:top + self.crop, left:left + self.crop]
        if torch.rand(()).item() < self.hflip:
            img, label = img.flip(-1), label.flip(-1)
        return img.contiguous(), label.contiguous()


class SegValTransform:
    """Resize the image (aspect kept) to short side ``scale`` (long side at most 4×), normalise; the label
    keeps its size, so that metrics are computed at the original resolution. ``scale=0`` keeps the size."""

    def __init__(self, scale: int = 512, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        self.scale = scale
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, img: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        img = (img.float() / 255 - self.mean) / self.std
        if self.scale:
            img, _ = _resize(img, None, _scaled_size(*img.shape[-2:], self.scale, 4 * self.scale))
        return img, label


class ADE20KDataset(Dataset):
    """Image/label pairs of an ADE20K-layout folder.

    Args:
        root: the dataset folder (``ADEChallengeData2016``).
        split: ``'training'`` or ``'validation'``.
        transform: joint transform ``(image uint8 [3, H, W], label int64 [H, W]) -> (image, label)``.
        num_classes: classes after the shift (default 150).
        reduce_zero_label: label 0 is ignored and labels shift down by one (default True).
        ignore_index: the label of ignored pixels (default 255).

    Raises:
        FileNotFoundError: a missing folder, no images, or an image without its annotation.
        ValueError (when an item is read): a label value out of range, naming the file.
    """

    def __init__(
            self,
            root: str | Path,
            split: str = 'training',
            transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
            *,
            num_classes: int = 150,
            reduce_zero_label: bool = True,
            ignore_index: int = 255,
    ) -> None:
        root = Path(root)
        img_dir, ann_dir = root / 'images' / split, root / 'annotations' / split
        for d in (root, img_dir, ann_dir):
            if not d.is_dir():
                raise FileNotFoundError(
                    f'{d} is not a directory; an ADE20K folder holds images/{{training,validation}}/*.jpg and '
                    f'annotations/{{training,validation}}/*.png')
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f'no images ({", ".join(IMAGE_SUFFIXES)}) in {img_dir}')
        missing = [p.name for p in images if not (ann_dir / f'{p.stem}.png').is_file()]
        if missing:
            raise FileNotFoundError(f'{len(missing)} image(s) of {img_dir} have no annotation in {ann_dir}: '
                                    f'{missing[:5]}')
        if ignore_index < num_classes:
            raise ValueError(f'ignore_index {ignore_index} must not be a class index (< num_classes {num_classes})')
        self.samples = [(p, ann_dir / f'{p.stem}.png') for p in images]
        self.transform, self.num_classes = transform, num_classes
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, path: Path) -> Tensor:
        """The label map of ``path`` as class indices [H, W] int64, ``ignore_index`` where ignored."""
        with Image.open(path) as im:
            if im.mode not in ('L', 'P', 'I', 'I;16'):
                raise ValueError(f'{path}: a label map must be a single-channel PNG, got mode {im.mode}')
            label = torch.from_numpy(np.array(im, dtype=np.int64))
        top = self.num_classes + (1 if self.reduce_zero_label else 0)
        bad = (label < 0) | ((label >= top) & (label != self.ignore_index))
        if bad.any():
            raise ValueError(
                f'{path}: label values must be in [0, {top - 1}] (or {self.ignore_index}, ignored) for '
                f'{self.num_classes} classes{" with label 0 ignored" if self.reduce_zero_label else ""}; found '
                f'{sorted(set(label[bad].unique().tolist()))[:10]}')
        if self.reduce_zero_label:
            ignored = (label == 0) | (label == self.ignore_index)
            label = torch.where(ignored, torch.full_like(label, self.ignore_index), label - 1)
        return label

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        img_path, ann_path = self.samples[index]
        with Image.open(img_path) as im:
            img = pil_to_tensor(im.convert('RGB'))
        label = self.read_label(ann_path)
        if label.shape != img.shape[-2:]:
            raise ValueError(f'{ann_path} is {tuple(label.shape)}, its image {tuple(img.shape[-2:])}')
        if self.transform is not None:
            img, label = self.transform(img, label)
        return img, label

