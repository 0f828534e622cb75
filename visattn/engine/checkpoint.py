"""Checkpoints: weights as safetensors, training state as a ``torch.save`` file that loads with
``weights_only=True``, both named in one small manifest that is switched atomically.

A checkpoint (weights, EMA, optimizer, scheduler, RNG, epoch, metrics) is one transaction: its files are written
under new unique names beside the previous checkpoint's (``ckpt-<epoch>-<token>.safetensors`` and ``.state.pt``),
each fsynced, and then ``checkpoint.json``, which records every file's size and sha256, replaces the old manifest
with ``os.replace``. Whatever instant a process dies at, the manifest names one complete checkpoint. The manifest
also names the previous checkpoint, which stays on disk (for ``--resume-fallback``) until the next one is complete;
``last.safetensors`` and ``best.safetensors`` are hard links to the current and the best weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from safetensors.torch import save as dump_safetensors

MANIFEST = 'checkpoint.json'
LAST_WEIGHTS = 'last.safetensors'
BEST_WEIGHTS = 'best.safetensors'
LEGACY_STATE = 'state.pt'
FORMAT = 'visattn-checkpoint-1'
STATE_ENTRIES = ('epoch', 'best', 'config', 'history', 'optimizer', 'scheduler', 'ema', 'scaler', 'rng')
_CKPT_FILE = re.compile(r'ckpt-\d{6,}-[0-9a-f]{8}\.(safetensors|state\.pt)')
_TMP_FILE = re.compile(r'\..+\.[A-Za-z0-9_]{6,}\.tmp')
_REFUSED = ('it holds Python objects other than tensors and plain containers, which a checkpoint may not hold '
            '(unpickling them could run code); it was not written by visattn, or it has been replaced')


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not match the run."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f'.{path.name}.{secrets.token_hex(6)}.tmp')


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a new temporary file beside ``path``, fsync it, then rename it over ``path``: readers
    never see half a file. The file is created with mode 0o666 less the user's umask."""
    path = Path(path)
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0), 0o666)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _link(src: Path, dst: Path) -> None:
    """Make ``dst`` name the file ``src`` atomically (a hard link; a copy where links are not supported)."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # (renaming a link over another link of the same file would leave the temporary name behind)
    tmp = _tmp_name(dst)
    try:
        os.link(src, tmp)
    except OSError:
        atomic_write(dst, src.read_bytes())
        return
    try:
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(dst.parent)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, 'module') or hasattr(model, '_orig_mod'):
        model = getattr(model, 'module', None) or model._orig_mod
    return model


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in unwrap(model).state_dict().items()}


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """The model's state dict as safetensors (shared tensors are stored once each, contiguous)."""
    atomic_write(path, dump_safetensors(_cpu_state(model), metadata=metadata))


def _torch_load(data: bytes | Path, name: str | Path) -> Any:
    """``torch.load(..., weights_only=True)`` with our own message for what it refuses to unpickle."""
    try:
        return torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location='cpu',
                          weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f'{name}: refused: {_REFUSED}') from None
    except Exception as e:
        raise CheckpointError(f'{name}: corrupt or truncated, or not a torch file ({first_line(e)})') from None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or from ``.pth``/``.pt``/``.bin`` loaded with ``weights_only=True``
    (a ``'state_dict'``, ``'model'`` or ``'state_dict_ema'`` entry is unwrapped; ``module.`` prefixes go)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    if path.suffix == '.safetensors':
        try:
            state = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f'{path}: corrupt or truncated, or not a safetensors file ({first_line(e)})'
                                  ) from None
    else:
        state = _torch_load(path, path)
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


def _write_entry(run_dir: Path, name: str, data: bytes) -> dict[str, Any]:
    atomic_write(run_dir / name, data)
    return {'name': name, 'bytes': len(data), 'sha256': hashlib.sha256(data).hexdigest()}


def save_checkpoint(run_dir: str | Path, model: nn.Module, state: dict[str, Any], *, epochs: int, is_best: bool,
                    previous: dict[str, Any] | None, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the checkpoint of ``state['epoch']`` as one transaction and return its manifest.

    Args:
        run_dir: the run folder.
        model: the model whose weights to save (wrappers are unwrapped).
        state: the entries of ``STATE_ENTRIES`` but ``'rng'`` (added here).
        epochs: the run's number of epochs (the manifest says whether the run is finished).
        is_best: these weights become ``best.safetensors``.
        previous: the manifest of the checkpoint this one follows (``None`` for the first).
        metadata: extra safetensors metadata of the weights (e.g. the epoch's metric).

    Raises:
        CheckpointError: the files could not be written (e.g. a full disk); the previous checkpoint is intact.
    """
    run_dir = Path(run_dir)
    epoch = int(state['epoch'])
    tag = f'ckpt-{epoch:06d}-{secrets.token_hex(4)}'
    try:
        weights = dump_safetensors(_cpu_state(model), metadata={'format': FORMAT, 'epoch': str(epoch),
                                                                **(metadata or {})})
        buf = io.BytesIO()
        torch.save(dict(state, format=FORMAT, rng=_rng_state()), buf)
        record = {'epoch': epoch, 'files': {'weights': _write_entry(run_dir, f'{tag}.safetensors', weights),
                                            'state': _write_entry(run_dir, f'{tag}.state.pt', buf.getvalue())}}
        record['best'] = record['files']['weights'] if is_best or previous is None else previous['current']['best']
        manifest = {'format': FORMAT, 'epochs': epochs, 'finished': epoch + 1 >= epochs, 'current': record,
                    'previous': previous['current'] if previous is not None else None}
        atomic_write(run_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    except OSError as e:
        sweep(run_dir, previous)
        raise CheckpointError(
            f'cannot write the checkpoint of epoch {epoch + 1} in {run_dir} ({e.strerror or e}); '
            f'the previous checkpoint is intact: free the space and continue with --resume {run_dir}') from None
    publish(run_dir, manifest)
    return manifest


def publish(run_dir: str | Path, manifest: dict[str, Any], *, clean: bool = True) -> None:
    """Point ``last.safetensors``/``best.safetensors`` at the manifest's weights; with ``clean``, delete the
    checkpoint files that it no longer names."""
    run_dir = Path(run_dir)
    current = manifest['current']
    _link(run_dir / current['files']['weights']['name'], run_dir / LAST_WEIGHTS)
    _link(run_dir / current['best']['name'], run_dir / BEST_WEIGHTS)
    if clean:
        sweep(run_dir, manifest)


def _referenced(manifest: dict[str, Any] | None) -> set[str]:
    if manifest is None:
        return set()
    records = [r for r in (manifest.get('current'), manifest.get('previous')) if r]
    return {e['name'] for r in records for e in (*r['files'].values(), r['best'])}


def sweep(run_dir: str | Path, manifest: dict[str, Any] | None) -> list[str]:
    """Delete the leftovers of interrupted writes: temporary files, and checkpoint files that ``manifest`` does not
    name (its current and previous checkpoints stay). Returns the names deleted."""
    run_dir = Path(run_dir)
    keep = _referenced(manifest)
    gone = []
    for path in sorted(run_dir.iterdir()):
        name = path.name
        if (_TMP_FILE.fullmatch(name) or (_CKPT_FILE.fullmatch(name) and name not in keep)) and path.is_file():
            path.unlink(missing_ok=True)
            gone.append(name)
    if gone:
        _fsync_dir(run_dir)
    return gone


def _check_record(path: Path, record: Any) -> None:
    ok = isinstance(record, dict) and isinstance(record.get('epoch'), int) and isinstance(record.get('files'), dict)
    entries = [*record['files'].values(), record.get('best')] if ok else []
    ok = ok and {'weights', 'state'} <= set(record['files']) and all(
        isinstance(e, dict) and isinstance(e.get('name'), str) and _CKPT_FILE.fullmatch(e['name'])
        and isinstance(e.get('bytes'), int) and isinstance(e.get('sha256'), str) for e in entries)
    if not ok:
        raise CheckpointError(f'{path}: corrupt manifest (not a visattn checkpoint record)')


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a run folder, or ``None`` where it has none.

    Raises:
        CheckpointError: the manifest is corrupt.
    """
    path = Path(run_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f'{path}: corrupt manifest ({first_line(e)})') from None
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
        raise CheckpointError(f'{path}: corrupt manifest (format is not {FORMAT!r})')
    if not isinstance(manifest.get('epochs'), int) or not isinstance(manifest.get('finished'), bool):
        raise CheckpointError(f'{path}: corrupt manifest (no epochs / finished)')
    _check_record(path, manifest.get('current'))
    if manifest.get('previous') is not None:
        _check_record(path, manifest['previous'])
    return manifest


def resolve_resume(path: str | Path) -> Path:
    """The run folder that ``--resume path`` names (the folder, or its ``checkpoint.json``)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir() or path.name in (MANIFEST, LEGACY_STATE) and path.is_file():
        return folder
    raise CheckpointError(f'--resume: no checkpoint at {path}')


def _read_verified(run_dir: Path, entry: dict[str, Any]) -> bytes:
    path = run_dir / entry['name']
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f'{path}: missing (named in {MANIFEST})') from None
    if len(data) != entry['bytes']:
        raise CheckpointError(f'{path}: truncated or damaged: {len(data)} bytes, {MANIFEST} says {entry["bytes"]}')
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry['sha256']:
        raise CheckpointError(f'{path}: corrupt: sha256 {digest[:12]}..., {MANIFEST} says {entry["sha256"][:12]}...')
    return data


def _check_finite(path: Path, obj: Any, where: str) -> None:
    """Raise on the first floating-point tensor in ``obj`` (nested dicts/lists) that holds NaN or inf."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            raise CheckpointError(f'{path}: entry {where!r} holds NaN or inf values')
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(path, v, f'{where}.{k}' if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_finite(path, v, f'{where}.{i}')


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str = '',
                   ) -> None:
    """``tensors`` has exactly the entries of ``own``, of the same shapes, all finite."""
    prefix = f'{where}.' if where else ''
    for names, what in ((sorted(set(own) - set(tensors)), 'missing'), (sorted(set(tensors) - set(own)),
                                                                          'unexpected')):
        if names:
            more = f' (and {len(names) - 1} more)' if len(names) > 1 else ''
            raise CheckpointError(f'{path}: {what} entry {prefix + names[0]!r}{more}: it is not of this model')
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f'{path}: entry {prefix + k!r} is a {type(v).__name__}, not a tensor')
        if v.shape != own[k].shape:
            raise CheckpointError(f'{path}: entry {prefix + k!r} has shape {tuple(v.shape)}, the model expects '
                                  f'{tuple(own[k].shape)}')
    _check_finite(path, tensors, where)


def _load_record(run_dir: Path, record: dict[str, Any], model: nn.Module, expect: dict[str, Any],
                 ema: nn.Module | None) -> dict[str, Any]:
    """Verify every file of ``record`` and every entry it must hold; only then load the weights and the RNG."""
    files = record['files']
    state_path, weights_path = run_dir / files['state']['name'], run_dir / files['weights']['name']
    state_data, weights_data = _read_verified(run_dir, files['state']), _read_verified(run_dir, files['weights'])
    _read_verified(run_dir, record['best'])
    state = _torch_load(state_data, state_path)
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise CheckpointError(f'{state_path}: not a visattn training state (format {FORMAT!r})')
    missing = [k for k in STATE_ENTRIES if k not in state]
    if missing:
        raise CheckpointError(f'{state_path}: missing entry {missing[0]!r}')
    if state['epoch'] != record['epoch']:
        raise CheckpointError(f'{state_path}: holds epoch {state["epoch"] + 1}, {MANIFEST} says {record["epoch"] + 1}')
    saved = state['config'] if isinstance(state['config'], dict) else {}
    diff = {k: (saved.get(k), v) for k, v in expect.items() if saved.get(k) != v}
    if diff:
        detail = ', '.join(f'{k}: checkpoint {a!r}, this run {b!r}' for k, (a, b) in diff.items())
        raise CheckpointError(f'{state_path}: the checkpoint of another run ({detail})')
    _check_finite(state_path, {k: state[k] for k in ('optimizer', 'scheduler', 'scaler')}, '')
    if (state['ema'] is None) != (ema is None):
        raise CheckpointError(f"{state_path}: entry 'ema' is {'absent' if ema is not None else 'present'}, "
                              f"this run {'uses' if ema is not None else 'does not use'} --model-ema")
    if ema is not None:
        if not isinstance(state['ema'], dict):
            raise CheckpointError(f"{state_path}: entry 'ema' is not a state dict")
        _check_tensors(state_path, state['ema'], ema.state_dict(), 'ema')
    try:
        weights = load_safetensors(weights_data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f'{weights_path}: not a safetensors file ({first_line(e)})') from None
    _check_tensors(weights_path, weights, unwrap(model).state_dict())
    unwrap(model).load_state_dict(weights, strict=True)
    _set_rng_state(state['rng'])
    return state


def load_checkpoint(run_dir: str | Path, model: nn.Module, expect: dict[str, Any], *, ema: nn.Module | None = None,
                    fallback: bool = False, log: Callable[[str], Any] = print,
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify and load the checkpoint of a run folder into ``model``; restore the RNG states.

    Args:
        run_dir: the run folder.
        model: the (unwrapped) model to load the weights into, strictly.
        expect: entries of the saved ``'config'`` that must match this run (e.g. model, num_classes).
        ema: the run's EMA model (its saved weights are checked against it), or ``None`` without EMA.
        fallback: on a damaged checkpoint, resume from the previous one that the manifest names.
        log: where the fall-back is reported.

    Returns:
        ``(state, manifest)``: the state (optimizer, scheduler, ema, scaler, epoch, best, history) for the caller
        to load, and the manifest of the checkpoint loaded (its ``'current'`` record is the one loaded).

    Raises:
        CheckpointError: one line naming the file and the entry: a missing or corrupt file (sha256, size), a
        missing entry, NaN/inf values, shapes or a config that do not match this run.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is None:
        if (run_dir / LEGACY_STATE).is_file():
            raise CheckpointError(f'{run_dir / LEGACY_STATE}: a checkpoint of an older visattn, without the '
                                  f'{MANIFEST} that verifies it; it cannot be resumed by this version')
        raise CheckpointError(f'--resume: no checkpoint in {run_dir} (no {MANIFEST}); a run that stopped before its '
                              'first checkpoint starts again without --resume')
    current, previous = manifest['current'], manifest.get('previous')
    try:
        return _load_record(run_dir, current, model, expect, ema), manifest
    except CheckpointError as e:
        if previous is None or not fallback:
            hint = (f'; --resume-fallback resumes from the previous checkpoint (epoch {previous["epoch"] + 1})'
                    if previous is not None else '')
            raise CheckpointError(f'{e}{hint}') from None
        log(f'{e}; falling back to the previous checkpoint (epoch {previous["epoch"] + 1}) as --resume-fallback '
            f'asks')
    state = _load_record(run_dir, previous, model, expect, ema)
    return state, dict(manifest, current=previous, previous=None)


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
