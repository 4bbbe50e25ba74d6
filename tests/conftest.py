"""Shared fixtures. Keep minimal: each fixture is session-scoped and cheap to share."""

import os

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def toy_world():
    """The tiny toy safety world (built once per session, ~15 s on 2 CPU cores)."""
    from irr_callback.toy import build_toy_world

    return build_toy_world(seed=0, size="tiny")
