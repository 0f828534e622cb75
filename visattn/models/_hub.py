"""timm's published weights without waiting on an unreachable hub: a local copy loads from its file, and with
neither the hub nor a copy a one-line error says how to pass a file."""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

import timm
import torch.nn as nn

__all__ = ['HubUnreachableError', 'cached_weights', 'create_pretrained', 'hub_reachable']


class HubUnreachableError(OSError):
    """The Hugging Face hub cannot be reached and the weights asked for are not on this machine."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co) accepts a connection within
    ``timeout`` seconds; False under ``HF_HUB_OFFLINE=1``."""
    if os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes'):
        return False
    url = urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
    try:
        with socket.create_connection((url.hostname or 'huggingface.co', url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def cached_weights(name: str) -> str | None:
    """The local file of ``name``'s published weights: its ``pretrained_cfg`` ``file``, or the copy in the Hugging
    Face cache from an earlier download; None when there is none."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.file:
        return str(cfg.file)
    if not cfg.hf_hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = cfg.hf_hub_id.partition('@')
    for filename in ('model.safetensors', 'pytorch_model.bin', 'open_clip_pytorch_model.bin'):
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def create_pretrained(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)``, without waiting on an unreachable hub: weights
    already on this machine load from their file; with neither the hub nor a local copy, a one-line
    `HubUnreachableError` says how to give a local file (instead of a traceback after a minute of retries)."""
    local = cached_weights(name)
    if local is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=local), **kwargs)
    if not hub_reachable():
        cfg = timm.models.get_pretrained_cfg(name)
        where = f'timm\'s weights of {name} ({cfg.hf_hub_id})' if cfg is not None and cfg.hf_hub_id else \
            f'the weights of {name}'
        raise HubUnreachableError(
            f'--pretrained: the Hugging Face hub cannot be reached from here and {where} are not on this machine; '
            'download the file where the hub is reachable and pass it with --init-from FILE (in Python: '
            f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file=FILE)))")
    return timm.create_model(name, pretrained=True, **kwargs)
