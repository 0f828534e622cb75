"""The embedded demo dataset and the data helpers of ``train.py``."""

from .digits import DIGITS_PATH, DigitsDataset, load_digits
from .folder import checked_image_folder
from .sampler import EpochSampler, ShardSampler

__all__ = ['DIGITS_PATH', 'DigitsDataset', 'EpochSampler', 'ShardSampler', 'checked_image_folder', 'load_digits']
