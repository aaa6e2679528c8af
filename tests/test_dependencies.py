"""The suite's own dependencies are installed: a missing one fails here instead of silently skipping its tests.

Several test modules skip when an optional library is absent (``pytest.importorskip("open_clip")`` keeps the suite
usable without the extras), so a CI that lost a dependency would pass with those tests skipped. CI installs the
``test`` extra of pyproject.toml; every distribution named there must import.
"""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
#: distribution name -> the module it provides, where they differ
MODULE_OF = {
    "open-clip-torch": "open_clip",
    "python-multipart": "multipart",
    "pyyaml": "yaml",
    "scikit-learn": "sklearn",
    "pillow": "PIL",
}


def _test_extra() -> list[str]:
    data = tomllib.loads(PYPROJECT.read_text())
    extras = data["project"]["optional-dependencies"]
    names = [re.split(r"[<>=!~ \[]", req, maxsplit=1)[0] for req in extras["test"] + extras["bench"]]
    return sorted(set(names))


@pytest.mark.parametrize("distribution", _test_extra())
def test_every_test_dependency_imports(distribution):
    module = MODULE_OF.get(distribution, distribution.replace("-", "_"))
    importlib.import_module(module)  # ImportError fails the suite: the tests that need it would only skip
