"""
The handout tests, one group per TODO: python -m pytest -q (all), python -m pytest -q -m lora_forward
(one TODO's; checks.MARKERS names them). Each runs a probe (probes.py) on your code and judges what it
returns (checks.py); the grader runs the same tests, the probe in a process of its own.
"""

import pytest
import torch

import checks
import probes


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    return checks.make_files(str(tmp_path_factory.mktemp("files")))


@pytest.mark.parametrize("test", [pytest.param(t, marks=getattr(pytest.mark, checks.MARKERS[t.task]),
                                               id=f"{t.task}: {t.name}") for t in checks.TESTS])
def test_handout(test, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a probe writes lands here
    inputs = test.inputs(torch.Generator().manual_seed(0), files)
    test.check(inputs, getattr(probes, test.probe)(**inputs))
