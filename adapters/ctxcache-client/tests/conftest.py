import pytest

from ctxcache_client.testing import live_gateway


@pytest.fixture(scope="session")
def gateway_url():
    with live_gateway() as url:
        yield url
