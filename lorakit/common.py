"""
What the scripts share: the device and precision to run on, atomic file writes and the hold a
command keeps on its out_dir, the Hugging Face Hub's reachability, turning a loader's ValueError into
the one-line error a user sees, and the learning-rate schedule.
"""

import errno
import fcntl
import json
import math
import os
import pickle
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from urllib.parse import urlparse

import tiktoken
import torch
from huggingface_hub import constants

from configurator import ConfigError, WriteError


def pick_device(name):
    """'auto' -> cuda, else mps, else cpu; a named device that is not there is a ConfigError."""
    if not re.fullmatch(r'auto|cpu|mps|cuda(:\d+)?', name):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, not {name!r}")
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


def _payload_bytes(obj):
    """Roughly how many bytes writing obj takes: its tensors' (or its own, for bytes) size."""
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(_payload_bytes, obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(map(_payload_bytes, obj))
    return 0


def _os_error(e):
    """The OSError behind e (torch.save wraps a failed write in a RuntimeError), or None."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def sync_folder(folder):
    """fsync a folder, so that a rename in it survives a power cut (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mb(n):
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{max(n, 1) / 2**10:.0f} kB"


# what to do about a failed write, by its cause
_WRITE_ADVICE = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some of your quota",
                 errno.EFBIG: "raise the file size limit (ulimit -f)", errno.EACCES: "make the folder writable",
                 errno.EPERM: "make the folder writable", errno.EROFS: "pick a folder on a writable disk"}


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def save_atomic(obj, path, write=torch.save):
    """
    Write obj to path so that a crash, a signal or a full disk leaves the old file or the new one,
    never a part: into a new temporary file of a unique name in path's folder (created exclusively,
    so a planted symlink is never followed), flushed to disk, renamed over path, the folder synced.
    obj is bytes, or what write(obj, file) writes (torch.save by default). A failed write is one
    WriteError naming the file and the space it needed; the temporary file is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would survive the rename: teammates could not read it
        with os.fdopen(fd, 'wb') as f:
            f.write(obj) if isinstance(obj, (bytes, bytearray)) else write(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        cause = _os_error(e)
        if isinstance(e, Exception) and cause is not None:
            free = shutil.disk_usage(folder).free
            advice = _WRITE_ADVICE.get(cause.errno, "fix that")
            raise WriteError(f"cannot write {path}: {cause.strerror or cause} (it needs about "
                             f"{_mb(_payload_bytes(obj))}, {_mb(free)} free there); {advice} and run "
                             f"the command again") from None
        raise
    sync_folder(folder)


def log_scale(ax):
    """A log-scale y axis labelled 1, 2, 5, 10, 20, ... in plain numbers."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    ax.set_yscale('log')
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FormatStrFormatter('%g'))
    ax.yaxis.set_minor_formatter(NullFormatter())


def save_figure(fig, path):
    """A matplotlib figure as a PNG at path, atomically, and the figure closed."""
    import matplotlib.pyplot as plt
    save_atomic(fig, path, write=lambda f, fh: f.savefig(fh, format='png', dpi=100))
    plt.close(fig)


def write_json(obj, path):
    save_atomic(json.dumps(obj, indent=2).encode() + b'\n', path)


def append_line(path, record, then="continue the run with --init_from=resume"):
    """One JSON line at the end of path; a full disk is a WriteError (ending in what to do then) and leaves
    the file as it was."""
    line = (json.dumps(record) + '\n').encode()
    try:
        with open(path, 'ab', buffering=0) as f:  # unbuffered: a failed write is seen here, not at close
            size = f.tell()
            try:
                while line:  # a short write (the disk filling up) is followed by one that fails
                    line = line[f.write(line):]
            except OSError:
                os.ftruncate(f.fileno(), size)  # no torn line for the next reader
                raise
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror}; {_WRITE_ADVICE.get(e.errno, 'fix that')}, "
                         f"then {then}") from None


def read_json(path, default=None):
    """The JSON object (a dict) in path, or default where it is missing, not JSON, or JSON of another form."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return default
    return value if isinstance(value, dict) else default


def read_jsonl(path):
    """(records, how many lines were dropped) of a JSON-lines file: blank lines are skipped; a torn or
    garbled line (what a kill in mid-write leaves) is dropped, not an error."""
    records, dropped = [], 0
    if not os.path.exists(path):
        return records, dropped
    try:
        f = open(path, 'rb')
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}; move it out of the way") from None
    with f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get('iter'), int):
                records.append(rec)
            else:
                dropped += 1
    return records, dropped


def _holder(lock_path):
    try:
        with open(lock_path) as f:
            info = json.load(f)
        return f"process {info['pid']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def hold_out_dir(out_dir, command):
    """
    Hold out_dir for as long as the block runs: a second command that would write there stops with one
    line naming the process that holds it. The hold is an flock on out_dir/.lock, which the kernel
    drops when the holder dies however it dies, so a killed run's lock is taken over without a word, and
    the temporaries of the atomic writes it was killed in are removed.
    out_dir is created if need be, and removed again if the block fails and leaves it empty.
    """
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir '{out_dir}': {e.strerror}; pick another --out_dir") from None
    lock_path = os.path.join(out_dir, '.lock')
    try:
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise ConfigError(f"cannot write to out_dir '{out_dir}': {e.strerror}; "
                                  f"pick another --out_dir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ConfigError(f"{out_dir} is in use by {_holder(lock_path)}: wait for it to finish, stop it, "
                                  f"or pick another --out_dir") from None
            try:  # the holder before us may have removed the file we opened; lock the one that is there
                if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except BaseException:
        _remove_if_empty(out_dir, created)
        raise
    if os.fstat(fd).st_size:  # a killed holder's record: what it was writing atomically is half a file
        for name in os.listdir(out_dir):
            if name.startswith('.') and name.endswith('.tmp'):  # save_atomic's temporaries
                try:
                    os.remove(os.path.join(out_dir, name))
                except OSError:
                    pass
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(dict(pid=os.getpid(), command=command,
                                     since=time.strftime('%Y-%m-%d %H:%M:%S'))).encode())
    except OSError:
        pass  # a full disk: the lock holds all the same, only the holder's name is missing
    try:
        yield
    finally:
        try:
            os.remove(lock_path)
        except FileNotFoundError:
            pass  # out_dir removed under the run: its own write error says so
        os.close(fd)
        _remove_if_empty(out_dir, created)


def _remove_if_empty(folder, created):
    if created:
        try:
            os.rmdir(folder)
        except OSError:
            pass


def command_line():
    return ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:200]


def error_summary(e):
    """'TypeName: first line of the message' (at most 200 characters of it), for one-line errors."""
    if isinstance(e, pickle.UnpicklingError):  # torch's message goes on to advise weights_only=False: never that
        return "UnpicklingError: it holds Python objects other than tensors, which are not loaded (that could run code)"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def as_config_error(load, *args, **kwargs):
    """load(...), its ValueError (a missing or malformed model, checkpoint or data set) as a ConfigError."""
    try:
        return load(*args, **kwargs)
    except Unreachable:
        raise  # fetch_inputs gathers these
    except ValueError as e:
        raise ConfigError(str(e)) from None


_hub_state = {}


def _hub_offline_set():
    return os.environ.get('HF_HUB_OFFLINE', '0').lower() not in ('0', '', 'false', 'no', 'off')


def hub_offline():
    """
    True when the Hugging Face Hub must not be asked: HF_HUB_OFFLINE is set, or one attempt to reach
    it failed. Without this check a machine with no network spends half a minute in the hub
    client's retries before it fails.
    """
    if _hub_offline_set():
        return True
    if 'offline' not in _hub_state:
        url = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == 'https' else 80)), timeout=5).close()
            _hub_state['offline'] = False
        except OSError:
            _hub_state['offline'] = True
    return _hub_state['offline']


def not_a_hub_id(name):
    """True for a name that can only be a path (./x, /x, ~/x, a/b/c): missing, it is no such directory."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _hub_why():
    if _hub_offline_set():
        return "HF_HUB_OFFLINE is set"
    return f"the Hugging Face Hub ({urlparse(constants.ENDPOINT).hostname}) cannot be reached"


class Unreachable(ValueError):
    """
    A download a command needs that cannot happen (offline, and not in the local cache). thing: what it
    is ("the data set 'x'"); fix: the flag or variable that gives a local copy instead. fetch_inputs
    reports every one of them in one line.
    """

    def __init__(self, thing, fix, why=None):
        self.thing, self.fix, self.why = thing, fix, why or _hub_why()
        super().__init__(f"cannot load {thing}: {self.why} and it is not in the local cache: connect to the "
                         f"internet, or download it where there is one and {fix}")


def gpt2_encoding():
    """tiktoken's GPT-2 encoding (downloaded once, then read from tiktoken's cache), or Unreachable."""
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # requests' errors when offline; a damaged cache
        raise Unreachable("tiktoken's GPT-2 encoding", "set TIKTOKEN_CACHE_DIR to the folder of its cached files",
                          f"its download failed ({type(e).__name__})") from None


def fetch_inputs(*loads):
    """
    The results of loads (functions of no arguments: the data set, the model, the tokenizer), each
    called in turn. What cannot be downloaded now is reported for all of them at once, in one
    ConfigError; any other failure at once.
    """
    results, missing = [], []
    for load in loads:
        try:
            results.append(load())
        except Unreachable as e:
            missing.append(e)
    if len(missing) == 1:
        raise ConfigError(str(missing[0]))
    if missing:
        raise ConfigError(f"cannot load {len(missing)} things, none in the local cache: " +
                          "; ".join(f"{e.thing} ({e.why}: {e.fix})" for e in missing) +
                          "; connect to the internet, or download them where there is one")
    return results


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


TEXT_LIMIT = 1 << 20  # bytes of a reviews_file or prompt file read at most


def read_text(path, what):
    """A regular file's text (never a device or a pipe, which may never end), up to TEXT_LIMIT bytes."""
    path = os.path.expanduser(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"{what} {path} is not a regular file: give a text file")
        with open(path, 'rb') as f:
            data = f.read(TEXT_LIMIT + 1)
        if len(data) > TEXT_LIMIT:
            raise ConfigError(f"{what} {path} is larger than {TEXT_LIMIT >> 20} MB: give a shorter text")
        return data.decode('utf-8')
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
