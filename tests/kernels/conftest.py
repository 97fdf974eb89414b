import pytest
import torch


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """The kernel tests use tiny tensors: two OpenMP threads only add barrier waits, which on a
    busy 2-core machine made single tests take seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
