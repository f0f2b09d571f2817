"""The documentation site: every page in the nav exists, relative links and images
resolve, and (where mkdocs is installed) ``mkdocs build --strict`` passes."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text.split("\nnav:", 1)[1].split("\n\n", 1)[0]
    return re.findall(r":\s*(\S+\.md)\s*$", nav, flags=re.MULTILINE)


def test_nav_pages_exist() -> None:
    pages = nav_pages()
    assert "operations.md" in pages and "api.md" in pages and "migration.md" in pages
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml nav lists pages that do not exist: {missing}"


def test_relative_links_and_images_resolve() -> None:
    broken = []
    for page in sorted(DOCS.rglob("*.md")):
        in_code = False
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
            if in_code:
                continue
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                    continue  # http:, mailto:, in-page anchors
                path = target.split("#", 1)[0]
                if path and not (page.parent / path).resolve().exists():
                    broken.append(f"{page.relative_to(ROOT)}:{number}: {target}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs and mkdocstrings are not installed (pip install -e '.[docs]')",
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "operations" / "index.html").is_file()
    assert "asyncsession.instrument.instrument" in (tmp_path / "api" / "index.html").read_text()


def test_api_reference_covers_every_public_name() -> None:
    """docs/api.md has a ``::: module.name`` entry for each name in ``asyncsession.__all__``,
    and that entry is the object ``asyncsession`` exports."""
    import importlib

    import asyncsession

    entries = re.findall(r"^::: ([\w.]+)$", (DOCS / "api.md").read_text(), flags=re.MULTILINE)
    documented: dict[str, str] = {path.rsplit(".", 1)[1]: path for path in entries}
    missing = [n for n in asyncsession.__all__ if n != "__version__" and n not in documented]
    assert not missing, f"docs/api.md lacks ::: entries for {missing}"
    for name in asyncsession.__all__:
        if name == "__version__":
            continue
        module, _, attr = documented[name].rpartition(".")
        assert getattr(importlib.import_module(module), attr) is getattr(asyncsession, name), name


def test_no_project_internal_vocabulary() -> None:
    """Words a user cannot know: the Go package the design follows is named once, in
    docs/index.md, and the docs speak Python after that."""
    words = re.compile(r"the seed|NewWithControls|NewOmniStorageStore|\(issue \d+\)", re.I)
    found = [
        f"{page.relative_to(ROOT)}:{number}: {line.strip()}"
        for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if words.search(line)
    ]
    assert not found, "\n".join(found)
