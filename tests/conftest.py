import pytest

import syncdeco._backend


@pytest.fixture(autouse=True)
def _fresh_config():
    syncdeco._backend.reset()
    yield
    syncdeco._backend.reset()
