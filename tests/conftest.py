import os
import sys

import pytest

# Shared helpers (rank_harness) live beside this file; test folders are not packages (a tests/kernels
# package would shadow the real kernels package).
sys.path.insert(0, os.path.dirname(__file__))

# Every test process shares one small built-in dataset cache instead of writing to ~/.cache.
os.environ.setdefault("FASTSSL_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "tests"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the slow end-to-end tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end run: use --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
