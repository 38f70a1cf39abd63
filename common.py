"""
What the scripts share: the device and precision to run on, atomic file writes, the Hugging Face
Hub's reachability, turning a loader's ValueError into the one-line error a user sees, and the
learning-rate schedule.
"""

import math
import os
import socket
from contextlib import nullcontext
from urllib.parse import urlparse

import torch
from huggingface_hub import constants

from configurator import ConfigError


def pick_device(name):
    """'auto' -> cuda, else mps, else cpu; a named device that is not there is a ConfigError."""
    if name == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        return 'mps' if torch.backends.mps.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is available here; use --device=cpu (or auto)")
    if name == 'mps' and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but MPS is not available here; use --device=cpu (or auto)")
    return name


def pick_dtype(name, device):
    """'auto' -> bfloat16 on GPUs of compute capability 8.0 and above, float16 on older ones, else float32."""
    if name not in ('auto', 'float32', 'bfloat16', 'float16'):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, not {name!r}")
    if name == 'bfloat16' and device.startswith('cuda') and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype=bfloat16 but this GPU does not support it; use --dtype=float16")
    if name != 'auto':
        return name
    if device.startswith('cuda'):
        # a T4 (7.5) answers is_bf16_supported() with True but only emulates bfloat16, slowly
        return 'bfloat16' if torch.cuda.get_device_capability(device)[0] >= 8 else 'float16'
    return 'float32'


def autocast(device, dtype):
    """Mixed precision in dtype on device; nothing for float32."""
    if dtype == 'float32':
        return nullcontext()
    return torch.amp.autocast(device_type=device.split(':')[0], dtype=getattr(torch, dtype))


def save_atomic(obj, path, write=torch.save):
    """Write to path.tmp, flush to disk, then rename: a crash leaves the old file or the new one.
    obj is bytes, or what write(obj, file) writes (torch.save by default)."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        f.write(obj) if isinstance(obj, bytes) else write(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def error_summary(e):
    """'TypeName: first line of the message' (at most 200 characters of it), for one-line errors."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def as_config_error(load, *args, **kwargs):
    """load(...), its ValueError (a missing or malformed model, checkpoint or data set) as a ConfigError."""
    try:
        return load(*args, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


_hub_state = {}


def hub_offline():
    """
    True when the Hugging Face Hub must not be asked: HF_HUB_OFFLINE is set, or one attempt to reach
    it failed. Without this check a machine with no network spends half a minute in the hub
    client's retries before it fails.
    """
    if os.environ.get('HF_HUB_OFFLINE', '0').lower() not in ('0', '', 'false', 'no', 'off'):
        return True
    if 'offline' not in _hub_state:
        url = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == 'https' else 80)), timeout=5).close()
            _hub_state['offline'] = False
        except OSError:
            _hub_state['offline'] = True
    return _hub_state['offline']


def hub_unreachable_hint(what):
    """The end of the error for something that is neither local nor in the hub cache, offline."""
    if os.environ.get('HF_HUB_OFFLINE', '0').lower() not in ('0', '', 'false', 'no', 'off'):
        why = "HF_HUB_OFFLINE is set"
    else:
        why = f"the Hugging Face Hub ({urlparse(constants.ENDPOINT).hostname}) cannot be reached"
    return f"{why} and {what} is not in the local cache: connect to the internet, or download it where " \
           f"there is one and give its local directory instead"


def get_lr(c, it):
    """train.py's learning rate at iteration it: linear warmup, then (decay_lr) cosine decay to min_lr."""
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if not c.decay_lr:
        return c.learning_rate
    decay_iters = max(1, (c.lr_decay_iters or c.max_iters) - c.warmup_iters)
    ratio = min(1.0, (it - c.warmup_iters) / decay_iters)
    min_lr = c.min_lr or c.learning_rate / 10
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - min_lr)
