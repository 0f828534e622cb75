"""The training engine behind ``train.py``: configuration, tasks, the loop, checkpoints, distribution."""

from .checkpoint import CheckpointError, init_from, load_checkpoint, read_weights, save_weights
from .config import ConfigError, build_parser, list_configs, load_yaml, parse_args, resolve_config, save_config
from .rundir import RunFolderError, RunLock
from .runner import cli, run

__all__ = [
    'CheckpointError', 'ConfigError', 'RunFolderError', 'RunLock', 'build_parser', 'cli', 'init_from',
    'list_configs', 'load_checkpoint', 'load_yaml', 'parse_args', 'read_weights', 'resolve_config', 'run',
    'save_config', 'save_weights',
]
