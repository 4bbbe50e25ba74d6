"""Shared fixtures. Keep minimal: each fixture is session-scoped and cheap to share."""

import os

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def toy_world():
    """The tiny toy safety world (built once per session, ~15 s on 2 CPU cores)."""
    from irr_callback.toy import build_toy_world

    return build_toy_world(seed=0, size="tiny")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (two cores shared with other jobs: several times faster for tiny
    models). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
