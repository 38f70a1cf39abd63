"""The handout tests find the repository's modules and register a pytest marker per TODO (checks.MARKERS)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
if os.environ.get("TIKTOKEN_CACHE_DIR"):  # a relative cache would be lost when a test changes folder
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"])


def pytest_configure(config):
    from checks import MARKERS
    for task, marker in MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: the tests of {task}")
