import os

import pytest

from ctxcache_client.testing import live_gateway


@pytest.fixture(scope="session")
def gateway_url():
    """A real gateway (``ctxcache serve``)."""
    with live_gateway() as url:
        os.environ["CTXCACHE_BASE_URL"] = url + "/v1"
        yield url
