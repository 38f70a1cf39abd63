"""
Grade a submission: its handout files (any of lora.py, model.py, dataloader.py, train.py, generate.py)
over a fresh starter in a temporary folder, the handout tests run task by task in a subprocess with a
time limit, a table printed, and Gradescope's results.json written.

    python course/grade.py --submission=DIR --results=results.json

A task's points are shared by its tests; each test's name starts with its task (the handout's name of
the TODO). A submission that fails to import, hangs or prints a lot costs only the tasks it breaks.
"""

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lorakit.common import write_json  # noqa: E402
from configurator import ConfigError, configure, run_cli, settings_of  # noqa: E402
from starter import HANDOUT_FILES, write_starter  # noqa: E402

# -----------------------------------------------------------------------------
submission = ''  # a folder holding the student's handout files
results = 'results.json'  # where Gradescope's results go
timeout = 300  # seconds each task's tests may take
# -----------------------------------------------------------------------------
TESTS = os.path.join('course', 'tests', 'test_handout.py')
OUTPUT_LIMIT = 2000  # characters of a test's output kept in results.json
BROKEN = 'the tests could not run: the submission ends or breaks the test session'



def handout_tests(starter):
    """[(task, test function name, first line of its docstring or its name)] of the handout tests, in order."""
    with open(os.path.join(starter, TESTS)) as f:
        tree = ast.parse(f.read())
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith('test_'):
            for d in node.decorator_list:
                if isinstance(d, ast.Call) and getattr(d.func, 'id', None) == 'task':
                    out.append((d.args[0].value, node.name, node.name[5:].replace('_', ' ')))
    return out


def task_points(starter):
    with open(os.path.join(starter, 'course', 'tests', 'conftest.py')) as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'TASKS')
    return ast.literal_eval(node.value)


def run_task(starter, names, limit):
    """{test name: (passed, output)} of these tests, run in a subprocess of their own, for limit seconds."""
    report = os.path.join(starter, '.report.xml')
    if os.path.exists(report):
        os.remove(report)
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'--junitxml={report}',
           *[f'{TESTS}::{n}' for n in names]]
    try:
        with open(os.devnull, 'wb') as devnull:
            subprocess.run(cmd, cwd=starter, stdout=devnull, stderr=devnull, stdin=subprocess.DEVNULL, timeout=limit,
                           start_new_session=True)
    except subprocess.TimeoutExpired:
        return {n: (False, f'timed out after {limit} s') for n in names}
    try:
        cases = ET.parse(report).getroot().iter('testcase')
    except (OSError, ET.ParseError):
        return {n: (False, BROKEN) for n in names}
    out = {n: (False, 'did not run') for n in names}
    for case in cases:
        bad = next(iter(case.findall('failure') + case.findall('error') + case.findall('skipped')), None)
        why = '' if bad is None else (bad.get('message') or bad.text or '').strip()
        out[case.get('name')] = (bad is None, why[:OUTPUT_LIMIT])
    return out


def grade(submission_dir, limit):
    """Gradescope's results dict for a submission folder."""
    work = tempfile.mkdtemp(prefix='grade-')
    try:
        starter = os.path.join(work, 'starter')
        write_starter(starter)
        for name in HANDOUT_FILES:
            if os.path.isfile(os.path.join(submission_dir, name)):
                shutil.copyfile(os.path.join(submission_dir, name), os.path.join(starter, name))
        points, tests = task_points(starter), handout_tests(starter)
        # every test in one session first; a session that hangs or dies is run again task by task, so
        # that it costs only the tasks that hang or die
        outcome = run_task(starter, [n for _, n, _ in tests], limit * len(points))
        if any(why in ('did not run', BROKEN) or why.startswith('timed out') for _, why in outcome.values()):
            outcome = {}
            for task_name in points:
                outcome.update(run_task(starter, [n for t, n, _ in tests if t == task_name], limit))
        rows = []
        for task_name, max_points in points.items():
            names = [n for t, n, _ in tests if t == task_name]
            for t, n, title in tests:
                if t == task_name:
                    passed, why = outcome[n]
                    share = max_points / len(names)
                    rows.append(dict(name=f'{task_name}: {title}', score=round(share if passed else 0.0, 4),
                                     max_score=round(share, 4), output=why))
        return dict(score=round(sum(r['score'] for r in rows), 4), tests=rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv):
    c = configure(settings_of(globals()), argv)
    if not c.submission or not os.path.isdir(c.submission):
        raise ConfigError(f"submission must be a folder holding the handout files, not {c.submission!r}")
    if not any(os.path.isfile(os.path.join(c.submission, n)) for n in HANDOUT_FILES):
        raise ConfigError(f"{c.submission} holds none of {', '.join(HANDOUT_FILES)}")
    if c.timeout <= 0:
        raise ConfigError(f"timeout must be > 0 seconds, not {c.timeout}")
    out = grade(os.path.abspath(c.submission), c.timeout)
    width = max(len(r['name']) for r in out['tests'])
    for r in out['tests']:
        print(f"{r['name']:<{width}}  {r['score']:>5.2f} / {r['max_score']:<5.2f}  "
              f"{'ok' if r['score'] == r['max_score'] else (r['output'].splitlines() or [''])[0][:100]}")
    total = sum(r['max_score'] for r in out['tests'])
    print(f"score: {out['score']:.2f} / {total:.2f}")
    write_json(out, c.results)
    print(f"wrote {c.results}")
    return out


if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:], __file__))
