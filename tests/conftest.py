from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_random_checkpoint(tmp_path_factory):
    """(path, modules) of a random tiny all-in-one checkpoint with spiece.model beside it."""
    from tiny_random import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_random"))
