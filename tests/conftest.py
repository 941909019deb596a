"""Shared fixtures: the real data next to the repository, read in place."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ANNOTATIONS = Path(__file__).resolve().parent / "data" / "radiograph_annotations.csv"
"""Hand annotations of the shared radiographs: joint boxes and sides, and which films are laterals or feet."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data``; the tests need these real images, so missing data fails."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA.resolve()} (see README: test data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def radiographs_dir(shared_data: Path) -> Path:
    """27 real full knee radiographs (PNG/JPEG), unlabelled."""
    return shared_data / "radiographs"


@pytest.fixture(scope="session")
def oai_dir(shared_data: Path) -> Path:
    """Real OAI knee crops: ``{train,val}/{kl_grade}/<patient_id><side>.png``."""
    return shared_data / "oai-kl224"
