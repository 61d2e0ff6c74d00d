import pytest

from tests.integration.helpers import Procs


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.cleanup()


@pytest.fixture
def ipc_ep(tmp_path):
    return f"ipc://{tmp_path}/broker.sock"
