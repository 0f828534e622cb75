"""Checkpoints: weights as safetensors, training state as a ``torch.save`` file that loads with
``weights_only=True``; both written atomically (temporary file in the same folder, then ``os.replace``).

A run folder holds ``last.safetensors`` + ``state.pt`` (to resume) and ``best.safetensors``.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

STATE_FILE = 'state.pt'
LAST_WEIGHTS = 'last.safetensors'
BEST_WEIGHTS = 'best.safetensors'
FORMAT = 'visattn-train-1'


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not match the run."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, 'module') or hasattr(model, '_orig_mod'):
        model = getattr(model, 'module', None) or model._orig_mod
    return model


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """The model's state dict as safetensors (shared tensors are stored once each, contiguous)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in unwrap(model).state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or from ``.pth``/``.pt``/``.bin`` loaded with ``weights_only=True``
    (a ``'state_dict'``, ``'model'`` or ``'state_dict_ema'`` entry is unwrapped; ``module.`` prefixes go)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        if path.suffix == '.safetensors':
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f'cannot read {path}: corrupt, truncated, not a weights file, or holding Python objects that '
            f'weights_only=True refuses to unpickle ({e})') from None
    if isinstance(state, dict):
        for key in ('state_dict', 'model', 'state_dict_ema'):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{path} does not hold a state dict of tensors')
    return {k.removeprefix('module.'): v for k, v in state.items()}


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state['python'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_state(run_dir: str | Path, model: nn.Module, state: dict[str, Any]) -> None:
    """Save the weights (``last.safetensors``) and then the training state (``state.pt``) of a run.

    ``state`` holds the optimizer, scheduler, EMA, scaler, epoch and metrics; the RNG states are added here.
    """
    run_dir = Path(run_dir)
    epoch = str(state['epoch'])
    save_weights(model, run_dir / LAST_WEIGHTS, metadata={'epoch': epoch, 'format': FORMAT})
    full = dict(state, format=FORMAT, rng=_rng_state())
    atomic_write(run_dir / STATE_FILE, lambda tmp: torch.save(full, tmp))


def resolve_resume(path: str | Path) -> Path:
    """The ``state.pt`` of a run folder, or ``path`` itself if it is a file."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f'--resume: no checkpoint at {path}')
    return path


def load_state(path: str | Path, model: nn.Module, expect: dict[str, Any]) -> dict[str, Any]:
    """Load a run's training state and weights into ``model``; restore the RNG states.

    Args:
        path: ``state.pt`` or the run folder.
        model: the (unwrapped) model to load ``last.safetensors`` into, strictly.
        expect: entries of the saved ``'config'`` that must match this run (e.g. model, num_classes).

    Returns:
        the state dict (optimizer, scheduler, ema, scaler, epoch, ...) for the caller to load.

    Raises:
        CheckpointError: missing or corrupt files, a config mismatch, or weights of another epoch.
    """
    path = resolve_resume(path)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'cannot read {path}: corrupt, truncated or not a visattn training state ({e})') from None
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise CheckpointError(f'{path} is not a visattn training state (format {FORMAT!r})')
    saved = state.get('config', {})
    diff = {k: (saved.get(k), v) for k, v in expect.items() if saved.get(k) != v}
    if diff:
        detail = ', '.join(f'{k}: checkpoint {a!r} vs this run {b!r}' for k, (a, b) in diff.items())
        raise CheckpointError(f'{path} does not match this run ({detail})')
    weights_path = path.parent / LAST_WEIGHTS
    weights = read_weights(weights_path)
    try:
        from safetensors import safe_open

        with safe_open(str(weights_path), 'pt') as f:
            w_epoch = (f.metadata() or {}).get('epoch')
    except Exception:
        w_epoch = None
    if w_epoch != str(state['epoch']):
        raise CheckpointError(f'{weights_path} is from epoch {w_epoch}, {path} from epoch {state["epoch"]}')
    try:
        unwrap(model).load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f'{weights_path} does not fit the model: {e}') from None
    _set_rng_state(state['rng'])
    return state


def init_from(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a plain timm checkpoint (e.g. a ResNet's) into an attention backbone: every weight whose name and
    shape match loads; the rest (attention blocks, a classifier of another size) keep their initialisation.

    A first conv with another number of input channels is adapted with timm's ``adapt_input_conv``.

    Returns:
        ``{'loaded': [...], 'missing': [...], 'unexpected': [...], 'mismatched': [...]}`` (parameter names).
    """
    from timm.models import adapt_input_conv

    model = unwrap(model)
    src = read_weights(path)
    own = model.state_dict()
    take, mismatched = {}, []
    for k, v in src.items():
        if k not in own:
            continue
        if v.shape == own[k].shape:
            take[k] = v
        elif v.dim() == 4 and v.shape[0] == own[k].shape[0] and v.shape[2:] == own[k].shape[2:]:
            take[k] = adapt_input_conv(own[k].shape[1], v)
        else:
            mismatched.append(f'{k} {tuple(v.shape)} -> {tuple(own[k].shape)}')
    model.load_state_dict(take, strict=False)
    return {
        'loaded': sorted(take),
        'missing': sorted(set(own) - set(take)),
        'unexpected': sorted(set(src) - set(own)),
        'mismatched': mismatched,
    }
