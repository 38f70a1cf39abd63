"""
Write the homework's starter repository: this solution with every `# BEGIN SOLUTION` region replaced
by its stub (course/starter.py gives the marker grammar), a README for students and the handout tests.

    python course/make_starter.py --out_dir=DIR
    python course/make_starter.py --out_dir=DIR --overwrite=True   # replace a starter this command wrote

--overwrite=True replaces only a folder that holds a starter this command wrote (it leaves a marker
file, .starter), never one inside this repository or one a run holds; the new starter is written
beside it and swapped in, so a failure leaves the old one as it was.
"""

import os
import shutil
import sys
import tempfile
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configurator import ConfigError, configure, run_cli, settings_of  # noqa: E402  (first: --help skips torch)
from lorakit.common import command_line, hold_out_dir  # noqa: E402
from starter import ROOT, write_starter  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = ''  # where the starter goes: a new or empty folder
overwrite = False  # replace a starter this command wrote before
# -----------------------------------------------------------------------------
MARKER = ".starter"  # what makes a folder one this command may replace


def check_destination(c):
    """The starter's absolute path, or a ConfigError saying why it cannot go there."""
    if not c.out_dir:
        raise ConfigError("out_dir is not set: name the starter's folder, e.g. --out_dir=starter")
    dest = os.path.abspath(os.path.expanduser(c.out_dir))
    real = os.path.realpath(dest)
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise ConfigError(f"out_dir {c.out_dir} is a file: pick a folder")
    if os.path.commonpath([real, ROOT]) in (real, ROOT):
        raise ConfigError(f"out_dir {c.out_dir} is this repository, holds it or lies inside it: pick a folder outside it")
    if os.path.islink(dest):
        raise ConfigError(f"out_dir {c.out_dir} is a symbolic link: name the folder itself")
    if os.path.isdir(dest) and os.listdir(dest):
        if not c.overwrite:
            raise ConfigError(f"out_dir {c.out_dir} is not empty: pick another --out_dir, or replace a starter written "
                              f"before with --overwrite=True")
        if not os.path.isfile(os.path.join(dest, MARKER)):
            raise ConfigError(f"out_dir {c.out_dir} holds no starter written by this command (no {MARKER} file): "
                              f"--overwrite=True replaces only those; pick another --out_dir")
    parent = os.path.dirname(dest)
    if not os.access(parent if os.path.isdir(parent) else os.path.dirname(parent), os.W_OK):
        raise ConfigError(f"cannot write to {parent}: pick a folder you can write to")
    return dest


def main(argv):
    c = configure(settings_of(globals()), argv)
    dest = check_destination(c)
    parent = os.path.dirname(dest)
    try:
        os.makedirs(parent, exist_ok=True)
        stage = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dest)}.")
    except OSError as e:
        raise ConfigError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        # written beside dest, then swapped in: a failure leaves dest as it was
        new = os.path.join(stage, "starter")
        try:
            write_starter(new)
            with open(os.path.join(new, MARKER), "w") as f:
                f.write("written by course/make_starter.py: --overwrite=True may replace this folder\n")
        except OSError as e:
            raise ConfigError(f"cannot write the starter to {parent}: {e.strerror}; nothing was changed") from None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # the old starter is held while it is swapped out: a run or another make_starter there stops this one
        with hold_out_dir(dest, command_line()) if os.path.isdir(dest) else nullcontext():
            try:
                if os.path.isdir(dest):
                    os.rename(dest, os.path.join(stage, "old"))
                os.rename(new, dest)
            except OSError:
                raise ConfigError(f"another command wrote {c.out_dir} at the same time: run this one again") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"wrote the starter to {dest}; its handout tests: cd {c.out_dir} && python -m pytest -q")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], __file__))
