"""Fixtures of the model tests."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Runs a test on one intra-op thread, then restores the setting.

    The tensors here are tiny: a second thread only adds synchronisation, and on a
    busy 2-core machine OpenMP threads waiting for each other cost ~10x the work.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
