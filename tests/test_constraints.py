"""CI installs from a lock (constraints.txt) of the versions the suite passed with; pyproject keeps bounds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the check needs no more than one interpreter


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_dependency_is_pinned_within_the_declared_bounds() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    assert "centernet-edge" not in pins
    for text in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"
        # pyproject keeps lower bounds only: users are not locked, CI is.
        assert all(spec.operator in (">=", ">", "!=") for spec in req.specifier), text
    assert pins["torch"] == Version("2.13.0")  # the CPU build CI installs first


def test_ci_and_quickstart_install_from_the_lock() -> None:
    for script in (ROOT / ".ci" / "run", ROOT / "scripts" / "quickstart.sh"):
        installs = [ln for ln in script.read_text().splitlines() if "pip install" in ln and "-e" in ln]
        assert installs and all("-c constraints.txt" in ln for ln in installs), script.name
    latest = (ROOT / "scripts" / "check_latest_deps.sh").read_text()
    assert "--upgrade" in latest and "-c constraints.txt" not in latest
