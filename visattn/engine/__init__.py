"""The training engine behind ``train.py``: configuration, tasks, the loop, checkpoints, distribution."""

from .checkpoint import CheckpointError, init_from, read_weights, save_weights
from .config import build_parser, load_yaml, parse_args, save_config
from .runner import run

__all__ = [
    'CheckpointError', 'build_parser', 'init_from', 'load_yaml', 'parse_args', 'read_weights', 'run', 'save_config',
    'save_weights',
]
