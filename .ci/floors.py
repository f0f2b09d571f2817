"""The lowest version pyproject.toml declares for each library dependency (core and
the library extras), pinned with ``==``: what ``.ci/run``'s oldest-versions smoke
and ``nox -s oldest`` install. Test, bench and docs tools are not pinned.

    python .ci/floors.py          # the pins, one line (for pip install)
    python .ci/floors.py --check  # exit 1 unless each installed version is its floor
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

LIBRARY_EXTRAS = ("redis", "sqlite", "asgi", "otel", "prometheus", "crypto")
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def floors(pyproject: Path = PYPROJECT) -> list[tuple[str, str, str]]:
    """(requirement name with extras, distribution name, floor) of each dependency."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    wanted = list(project["dependencies"])
    for extra in LIBRARY_EXTRAS:
        wanted += project["optional-dependencies"][extra]
    out = []
    for requirement in wanted:
        match = re.fullmatch(r"(([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?)>=([0-9][0-9.]*)", requirement)
        if match is None:
            sys.exit(f"{requirement!r}: give every library dependency a '>=' floor")
        name, dist, floor = match.groups()
        out.append((name, dist, floor))
    return out


def _release(text: str) -> tuple[int, ...]:
    parts = [int(p) for p in re.findall(r"\d+", text)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def main() -> int:
    pins = floors()
    if sys.argv[1:] == ["--check"]:
        wrong = [
            f"{dist} {version(dist)} (floor {floor})"
            for _, dist, floor in pins
            if _release(version(dist)) != _release(floor)
        ]
        if wrong:
            print("not at the declared floor: " + ", ".join(wrong), file=sys.stderr)
            return 1
        print("at the declared floors: " + ", ".join(f"{d} {f}" for _, d, f in pins))
        return 0
    print(" ".join(f"{name}=={floor}" for name, _, floor in pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
