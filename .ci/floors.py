"""Print the lowest version pyproject.toml declares for each library dependency
(core and the library extras), pinned with ``==``: what ``.ci/run``'s oldest-versions
smoke installs (``nox -s oldest`` too). Test, bench and docs tools are not pinned."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

LIBRARY_EXTRAS = ("redis", "sqlite", "asgi", "otel", "prometheus", "crypto")


def floors(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    wanted = list(project["dependencies"])
    for extra in LIBRARY_EXTRAS:
        wanted += project["optional-dependencies"][extra]
    pins = []
    for requirement in wanted:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+(?:\[[a-z,]+\])?)>=([0-9][0-9.]*)", requirement)
        if match is None:
            sys.exit(f"{requirement!r}: give every library dependency a '>=' floor")
        name, version = match.groups()
        pins.append(f"{name}=={version}")
    return pins


if __name__ == "__main__":
    print(" ".join(floors(Path(__file__).resolve().parent.parent / "pyproject.toml")))
