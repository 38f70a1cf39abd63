"""
Settings from config files and key=value flags, after nanoGPT's configurator.

    python train.py configs/finetune_params_config.py --init_from=gpt2-medium --lr=1e-4 rank=16
    python train.py --help            # every setting, its default and what it does

A script's settings are the module-level names between its two `# ---` lines, each with a comment.
A positional argument is a config file: Python, executed as nanoGPT does (so only run config files
you trust); every top-level name it sets must be a known setting. Then `--key=value` (or `key=value`,
or `--key-with-dashes=value`) overrides one setting. A text setting takes the value as it is written
(quotes around it removed); other values are read with ast.literal_eval (never eval) and must have
the type of the default, from a flag or a config file: an int is accepted for a float, never None, a
callable or an integer beyond 64 bits. A leading ~ in a setting that names a file or folder is the
home folder.

A script that runs run_cli answers --help as soon as it imports this module: help_text reads the script's
source alone, so the scripts import it before torch and the help costs no heavy import.
"""

import ast
import difflib
import glob
import math
import os
import signal
import sys
import types

# the handout's short names
ALIASES = {"rank": "lora_rank", "alpha": "lora_alpha", "lr": "learning_rate"}
HELP = ("-h", "--help")


class ConfigError(ValueError):
    """A bad setting; the scripts print its message as one line and exit with status 2."""


class WriteError(Exception):
    """A file that cannot be written (a full disk, no permission): one line, status 1."""


class Interrupted(BaseException):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) that stops a command: one line, status 128 + the signal."""

    def __init__(self, signum, message=""):
        super().__init__(message)
        self.signum = signum


def stop_signals():
    """The signals that ask a command to stop: Ctrl-C, SIGTERM (what Slurm, Kubernetes, `timeout` and
    notebook restarts send), SIGUSR1 (Slurm's `--signal=USR1@60` warning before pre-emption) and
    SIGHUP (a closed terminal) unless the command was started to ignore it (nohup)."""
    sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        sigs.append(signal.SIGHUP)
    return sigs


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


class Settings(dict):
    """A script's settings: read them as attributes, c.max_iters."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    __setattr__ = dict.__setitem__

    def frozen(self):
        """These settings, read-only: once checked, a setting that changes is a bug."""
        return FrozenSettings(self)


class FrozenSettings(Settings):
    def _refuse(self, *args, **kwargs):
        raise TypeError("settings are read-only once checked")

    __setitem__ = __setattr__ = __delitem__ = update = pop = setdefault = _refuse


def settings_of(namespace):
    """A script's settings: the names assigned between its two `# ---` lines, with their values in namespace
    (its globals())."""
    return Settings({key: namespace[key] for key, _, _ in _settings_block(namespace["__file__"]) if key})


def _settings_block(script):
    """(name, value as written, comment) of each line between a script's two `# ---` lines; a comment
    line on its own gives (None, None, comment)."""
    with open(script) as f:
        lines = f.read().splitlines()
    bounds = [i for i, line in enumerate(lines) if line.startswith("# ---")][:2]
    out = []
    for line in lines[bounds[0] + 1:bounds[1]] if len(bounds) == 2 else []:
        if line.startswith("#"):
            out.append((None, None, line.lstrip("# ")))
        elif line.strip():
            node = ast.parse(line).body[0]
            key, value = (part.strip() for part in line[:node.end_col_offset].split("=", 1))
            out.append((key, value, line[node.end_col_offset:].strip().lstrip("#").strip()))
    return out


def one_of(name, value, choices):
    """The check() rule that value is one of choices."""
    return value not in choices, f"{name} must be one of {', '.join(map(str, choices))}, not {value!r}"


def check(rules):
    """rules: (is_bad, message) pairs; the first bad one is a ConfigError."""
    for bad, message in rules:
        if bad:
            raise ConfigError(message)


def _suggest(key, known):
    close = difflib.get_close_matches(key, sorted(set(known)), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(close)}?" if close else "; see --help for the settings"


def setting_name(flag):
    """The setting a flag (--key=value, key=value or --key-with-dashes=value) names: dashes read as underscores,
    the handout's short names as the settings they stand for."""
    key = flag.split("=", 1)[0].lstrip("-").replace("-", "_")
    return ALIASES.get(key, key)


def _check_key(key, config, where):
    key = ALIASES.get(key, key)
    if key not in config:
        raise ConfigError(f"unknown setting '{key}'{where}" + _suggest(key, list(config) + list(ALIASES)))
    return key


def _is_path(key):
    """Settings that name a file or folder: a leading ~ is the home folder there, as in a shell."""
    return key.endswith(("_dir", "_file", "init_from")) or key in ("dataset", "repo", "adapter", "submission", "results")


def _coerce(key, value, default, raw=None):
    """value with the type of default, or a ConfigError."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"setting '{key}' must be a finite number, not {value}")
    if type(value) is int and not -2**63 <= value < 2**63:  # what torch (and a seed) can hold
        raise ConfigError(f"setting '{key}' is out of range: {value} (a 64-bit integer, below 9.2e18)")
    if isinstance(value, str) and value.startswith("~") and _is_path(key):
        value = os.path.expanduser(value)
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, str) and raw is not None:
        return _coerce(key, raw, default)  # e.g. --init_from=gpt2-medium, or a name that parses as a number
    raise ConfigError(f"setting '{key}' expects {type(default).__name__} (like {default!r}), got {value!r}")


def _missing_config_file(path):
    """The error for a config file that is not there, naming the closest one that is."""
    here = [p for p in glob.glob("*.py") + glob.glob("*/*.py") if not p.startswith(("tests", "."))]
    same_name = [p for p in here if os.path.basename(p) == os.path.basename(path)]
    close = same_name or difflib.get_close_matches(path, here, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "settings are written --key=value"
    return ConfigError(f"config file '{path}' not found; {hint}")


def _run_config_file(path, config, defaults):
    namespace = dict(config)
    try:
        with open(path) as f:
            code = compile(f.read(), path, "exec")
    except SyntaxError as e:
        raise ConfigError(f"config file {path}, line {e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"config file {path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    try:
        exec(code, namespace)
    except (Exception, SystemExit) as e:  # a config file that calls exit() is still a bad config file
        line = next((tb.tb_lineno for tb in _frames(e.__traceback__) if tb.tb_frame.f_code.co_filename == path), "?")
        raise ConfigError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    for key, value in namespace.items():
        if key.startswith("_") or key in config and value is config[key]:
            continue
        if isinstance(value, (types.ModuleType, types.FunctionType, type)) and ALIASES.get(key, key) not in config:
            continue  # a helper of the config file's own, not a setting
            continue
        key = _check_key(key, config, f" in {path}")
        config[key] = _coerce(key, value, defaults[key])


def _frames(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def configure(defaults, argv):
    """New Settings: defaults updated by the config files and key=value flags in argv."""
    config = Settings(defaults)
    for arg in argv:
        if "=" not in arg:
            if arg.startswith("-"):
                raise ConfigError(f"'{arg}' is not a setting: write --key=value (e.g. --max_iters=100), or see --help")
            if not os.path.isfile(arg):
                raise _missing_config_file(arg)
            _run_config_file(arg, config, defaults)
            continue
        key, raw = setting_name(arg), arg.split("=", 1)[1]
        if not key:
            raise ConfigError(f"'{arg}' has no setting name: write --key=value")
        key = _check_key(key, config, "")
        if isinstance(defaults[key], str) and raw[:1] not in ("'", '"'):
            value = raw  # text is text: no parsing, whatever its length or what it looks like
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError, MemoryError, RecursionError):  # the last two: long or deep text
                if isinstance(defaults[key], float) and raw.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
                    value = float(raw)  # a non-finite number gets its own message
                elif defaults[key] is not None and not isinstance(defaults[key], str):
                    shown = raw if len(raw) <= 60 else raw[:57] + "..."
                    raise ConfigError(f"setting '{key}' expects {type(defaults[key]).__name__} "
                                      f"(like {defaults[key]!r}), got '{shown}'") from None
                else:
                    value = raw
        config[key] = _coerce(key, value, defaults[key], raw)
    return config


def override(defaults, settings):
    """New Settings: defaults with some of them set from Python (keyword arguments), checked as flags are."""
    config = Settings(defaults)
    for key, value in settings.items():
        key = _check_key(key, config, "")
        config[key] = _coerce(key, value, defaults[key])
    return config


def help_text(script):
    """The usage lines of a script's docstring, then each setting with its default and comment."""
    with open(script) as f:
        doc = (ast.get_docstring(ast.parse(f.read())) or "").strip().splitlines()
    name = os.path.basename(script)
    first = " ".join(doc[:doc.index("")] if "" in doc else doc) or name
    usage = []
    for line in doc:
        if line.startswith(("    python", "    torchrun")):
            usage.append(" ".join(line.split()))
        elif usage and line.startswith("      ") and line.strip():  # a usage line continued
            usage[-1] += " " + " ".join(line.split())
    lines = [first, "", "usage:"] + [f"  {u}" for u in usage or [f"python {name}"]]
    block = _settings_block(script)
    if not block:
        return "\n".join(lines + ["", "no settings"])
    lines += ["", "settings (--key=value; a config file's names override them too):"]
    for key, value, comment in block:
        lines.append(f"  {comment}:" if key is None else f"    --{key}={value}" + (f"  ({comment})" if comment else ""))
    aliases = ", ".join(f"{a}={k}" for a, k in ALIASES.items() if any(key == k for key, _, _ in block))
    if aliases:
        lines += ["", f"the handout's short names work too: {aliases}"]
    return "\n".join(lines)


class _Unbroken:
    """A stream whose reader may go away (`| head`, a closed notebook): from then on its writes go to
    /dev/null, so that printing never stops a run."""

    def __init__(self, stream):
        self._stream = stream

    def _drop(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # what is still buffered goes there too, at exit
        os.close(devnull)

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _unbroken(stream):
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # pytest's capture and the like: no pipe to break
        return stream
    return stream if isinstance(stream, _Unbroken) else _Unbroken(stream)


def run_cli(main, argv, script, errors=()):
    """
    The exit status of a script's main(argv): 0 unless it returns an int. --help (or -h) prints
    help_text(script). A ConfigError (status 2), a WriteError or one of errors (status 1) is printed as
    one line on stderr; so is a stop signal (status 128 + its number), which main may catch as
    Interrupted to finish its step first. Output whose reader has gone is dropped, not an error.
    """
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _unbroken(sys.stdout), _unbroken(sys.stderr)
    try:
        return _run(main, argv, script, errors)
    finally:
        sys.stdout.flush()  # while a closed pipe is still caught
        sys.stdout, sys.stderr = streams


def _run(main, argv, script, errors):
    if any(arg in HELP for arg in argv):
        print(help_text(script))
        return 0
    for sig in stop_signals():
        signal.signal(sig, _raise_interrupted)
    try:
        status = main(argv)
        return status if isinstance(status, int) else 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (WriteError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        for sig in stop_signals():
            signal.signal(sig, signal.SIG_IGN)  # the message below is the last word, whatever comes next
        name = signal.Signals(e.signum).name
        print(f"interrupted ({name}){': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:  # a pipe that is not stdout or stderr
        return 1


def _answer_help_early():
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    if not script or not any(arg in HELP for arg in sys.argv[1:]):
        return
    try:
        with open(script) as f:
            runs_cli = "run_cli(" in f.read()
    except (OSError, UnicodeDecodeError):
        return
    if runs_cli:
        out = _unbroken(sys.stdout)
        print(help_text(script), file=out)
        out.flush()
        sys.exit(0)


_answer_help_early()
