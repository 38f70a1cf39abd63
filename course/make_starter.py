"""
Write the homework's starter repository: this solution with every `# BEGIN SOLUTION` region replaced
by its stub (course/starter.py gives the marker grammar), a README for students and the handout tests.

    python course/make_starter.py --out_dir=DIR
    python course/make_starter.py --out_dir=DIR --overwrite=True   # replace a starter written before
"""

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configurator import ConfigError, configure, run_cli, settings_of  # noqa: E402
from starter import ROOT, write_starter  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = ''  # where the starter goes: a new or empty folder
overwrite = False  # replace what a non-empty out_dir holds
# -----------------------------------------------------------------------------


def main(argv):
    c = configure(settings_of(globals()), argv)
    if not c.out_dir:
        raise ConfigError("out_dir is not set: name the starter's folder, e.g. --out_dir=starter")
    dest = os.path.abspath(os.path.expanduser(c.out_dir))
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ConfigError(f"out_dir {c.out_dir} is a file: pick a folder")
    if os.path.commonpath([dest, ROOT]) == dest:
        raise ConfigError(f"out_dir {c.out_dir} holds this repository: pick a folder outside it")
    if os.path.isdir(dest) and os.listdir(dest) and not c.overwrite:
        raise ConfigError(f"out_dir {c.out_dir} is not empty: pick another --out_dir, or replace it with --overwrite=True")
    # written beside dest, then moved into place: a failure leaves dest as it was
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dest)}.")
    try:
        write_starter(os.path.join(tmp, "starter"))
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.rename(os.path.join(tmp, "starter"), dest)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote the starter to {dest}; its handout tests: cd {c.out_dir} && python -m pytest -q")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], __file__))
