"""The CUDA paths (marker gpu): collected everywhere, skipped with the reason where no GPU is visible.
benchmarks/gpu_check.sh runs them on a GPU machine."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these on one)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
