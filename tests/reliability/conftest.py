"""The uninterrupted reference run the fault tests resume against (and the determinism test repeats)."""

import pytest

from tests.reliability.runs import launch


@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("baseline"))
