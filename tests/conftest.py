import pytest

from tests.support.paths import FIXTURES_OBD, FIXTURES_UPSTREAM, SHARED_DIR


def pytest_sessionstart(session):
    if not FIXTURES_OBD.is_dir():
        raise pytest.UsageError(
            f"shared fixtures not found at {SHARED_DIR}; set TCMU_OBD_SHARED to the shared/ folder"
        )


@pytest.fixture(scope="session")
def shared_dir():
    return SHARED_DIR


@pytest.fixture(scope="session")
def fixtures_obd():
    return FIXTURES_OBD


@pytest.fixture(scope="session")
def fixtures_upstream():
    return FIXTURES_UPSTREAM


pytest_plugins = ["tests.support.registry", "tests.support.faultproxy"]
