"""
Write Gradescope's autograder package: the grader, the hidden tests and what the starter is made of,
with Gradescope's setup.sh and run_autograder, and the zip to upload.

    python course/make_autograder.py --out_dir=DIR     # DIR/autograder/ and DIR/autograder.zip

run_autograder grades /autograder/submission into /autograder/results/results.json (AUTOGRADER_ROOT
names another root, to try it on a copy); it first makes the grader's folder private, so the workers,
which run as a user of their own, cannot read the tests or the solution.
"""

import os
import shutil
import sys
import tempfile
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configurator import ConfigError, configure, run_cli, settings_of  # noqa: E402  (first: --help skips torch)
from starter import FILES, ROOT  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = ''  # a new or empty folder for autograder/ and autograder.zip
# -----------------------------------------------------------------------------
GRADER = ["course/grade.py", "course/starter.py", "course/worker.py", "course/hidden_checks.py",
          "course/STUDENT_README.md", "lorakit/variants.py"]
SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, to build the image: Python and the grader's packages (torch's CPU build)
set -euo pipefail
apt-get update -qq && apt-get install -y -qq python3 python3-pip python3-venv > /dev/null
cd /autograder/source
python3 -m pip install --quiet --break-system-packages torch --index-url https://download.pytorch.org/whl/cpu \\
  || python3 -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
python3 -m pip install --quiet --break-system-packages -r requirements.txt || python3 -m pip install --quiet -r requirements.txt
"""
RUN = """#!/usr/bin/env bash
# Gradescope runs this for each submission: results.json is always written
set -uo pipefail
ROOT="${AUTOGRADER_ROOT:-/autograder}"
chmod -R go-rwx "$ROOT/source"  # the workers run as another user: the grader, its tests and the solution are hidden
mkdir -p "$ROOT/results"
cd "$ROOT/source"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"${PYTHON:-python3}" course/grade.py --submission="$ROOT/submission" --results="$ROOT/results/results.json" \\
  || [ -s "$ROOT/results/results.json" ] \\
  || echo '{"score": 0, "output": "the grader failed; its output is in the autograder log", "tests": []}' \\
       > "$ROOT/results/results.json"
"""


def main(argv):
    c = configure(settings_of(globals()), argv)
    if not c.out_dir:
        raise ConfigError("out_dir is not set: name a folder for the package, e.g. --out_dir=autograder-package")
    dest = os.path.abspath(os.path.expanduser(c.out_dir))
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise ConfigError(f"out_dir {c.out_dir} is not an empty folder: pick a new one")
    if os.path.commonpath([dest, ROOT]) == ROOT:
        raise ConfigError(f"out_dir {c.out_dir} is inside this repository: pick a folder outside it")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    stage = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=f".{os.path.basename(dest)}.")
    try:
        package = os.path.join(stage, "autograder")
        for name in [*FILES, *GRADER]:
            os.makedirs(os.path.dirname(os.path.join(package, "source", name)), exist_ok=True)
            shutil.copyfile(os.path.join(ROOT, name), os.path.join(package, "source", name))
        for name, text in (("setup.sh", SETUP), ("run_autograder", RUN)):
            with open(os.path.join(package, name), "w") as f:
                f.write(text)
            os.chmod(os.path.join(package, name), 0o755)
            shutil.copyfile(os.path.join(package, name), os.path.join(package, "source", name))
        source = os.path.join(package, "source")
        with zipfile.ZipFile(os.path.join(stage, "autograder.zip"), "w", zipfile.ZIP_DEFLATED) as z:
            for folder, _, names in os.walk(source):
                for name in names:  # the zip's root is /autograder/source, setup.sh and run_autograder in it
                    path = os.path.join(folder, name)
                    z.write(path, os.path.relpath(path, source))
        if os.path.isdir(dest):
            os.rmdir(dest)
        os.rename(stage, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"wrote {dest}/autograder.zip (upload it as the assignment's autograder) and {dest}/autograder/")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], __file__))
