"""
Settings from config files and key=value flags, after nanoGPT's configurator.

    python train.py configs/finetune_params_config.py --init_from=gpt2-medium --lr=1e-4 rank=16

A positional argument is a config file: Python, executed as nanoGPT does (so only run config files
you trust); every top-level name it sets must be a known setting. Then `--key=value` (or `key=value`,
or `--key-with-dashes=value`) overrides one setting. Values are read with ast.literal_eval (never
eval) and must have the type of the default: an int is accepted for a float, and a value that is
not a Python literal is taken as a string where the setting is a string.
"""

import ast
import difflib
import os
import types

# the handout's short names
ALIASES = {"rank": "lora_rank", "alpha": "lora_alpha", "lr": "learning_rate"}


class ConfigError(ValueError):
    """A bad setting; the scripts print its message as one line and exit with status 2."""


def _suggest(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(close)}?" if close else "; see the settings at the top of the script"


def _check_key(key, config, where):
    key = ALIASES.get(key, key)
    if key not in config:
        raise ConfigError(f"unknown setting '{key}'{where}" + _suggest(key, list(config) + list(ALIASES)))
    return key


def _coerce(key, value, default, raw=None):
    """value with the type of default, or a ConfigError."""
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, str) and raw is not None:
        return raw  # e.g. --init_from=gpt2-medium, or a name that happens to parse as a number
    raise ConfigError(f"setting '{key}' expects {type(default).__name__} (like {default!r}), got {value!r}")


def configure(defaults, argv):
    """A new dict: defaults updated by the config files and key=value flags in argv."""
    config = dict(defaults)
    for arg in argv:
        if "=" not in arg:
            if arg.startswith("-"):
                raise ConfigError(f"'{arg}' is not a setting: write --key=value (e.g. --max_iters=100)")
            if not os.path.isfile(arg):
                raise ConfigError(f"config file '{arg}' not found (settings are written --key=value)")
            namespace = dict(config)
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), namespace)
            for key, value in namespace.items():
                if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    continue
                if key in config and value is config[key]:
                    continue
                key = _check_key(key, config, f" in {arg}")
                config[key] = _coerce(key, value, defaults[key])
        else:
            key, raw = arg.split("=", 1)
            key = key.lstrip("-").replace("-", "_")
            if not key:
                raise ConfigError(f"'{arg}' has no setting name: write --key=value")
            key = _check_key(key, config, "")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                if defaults[key] is not None and not isinstance(defaults[key], str):
                    raise ConfigError(f"setting '{key}' expects {type(defaults[key]).__name__} "
                                      f"(like {defaults[key]!r}), got '{raw}'") from None
                value = raw
            config[key] = _coerce(key, value, defaults[key], raw)
    return config


def run_cli(main, argv, errors=()):
    """The exit status of a script's main(argv) (0 unless it returns an int); a ConfigError (or one
    of errors) is printed as one line on stderr, with exit status 2."""
    import sys
    try:
        status = main(argv)
        return status if isinstance(status, int) else 0
    except (ConfigError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
