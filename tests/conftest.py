import pytest

import syncdeco._select


@pytest.fixture(autouse=True)
def _fresh_config():
    syncdeco._select.reset()
    yield
    syncdeco._select.reset()
