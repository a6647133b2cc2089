"""The documentation a newcomer reads stays true: the generated references say what the code
says, the site builds with no broken link, the README stays short and its links lead somewhere,
and the CHANGELOG names the version being built."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from cli.docs import PAGES, configuration_page, stale_pages
from federation.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_reference_pages_say_what_the_code_says() -> None:
    assert stale_pages() == [], "run `python -m cli.docs` and commit docs/"


def test_a_page_generated_from_other_code_is_reported_stale(tmp_path: Path) -> None:
    for name, render in PAGES.items():
        (tmp_path / name).write_text(render())
    assert stale_pages(tmp_path) == []
    (tmp_path / "cli.md").write_text(PAGES["cli.md"]().replace("--follow", "--watch"))
    assert stale_pages(tmp_path) == ["cli.md"]


def test_every_setting_is_in_the_configuration_reference_with_its_default() -> None:
    page = configuration_page()
    for name, field in Settings.model_fields.items():
        row = next(
            line for line in page.splitlines() if line.startswith(f"| `FEDAGENT_{name.upper()}` |")
        )
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert len(cells) == 4 and cells[3], row  # variable, type, default, a description
        if isinstance(field.default, int | float) and not isinstance(field.default, bool):
            assert cells[2].startswith(f"`{field.default}`"), row


def test_the_docs_site_builds_with_no_broken_link(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    assert (tmp_path / "security" / "index.html").exists()
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        assert text.startswith("# ") and len(text.splitlines()) > 10, f"{page.name} is empty"


def test_the_readme_fits_on_a_few_screens_and_its_links_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 8 * 1024, "the README is for a newcomer: move detail to docs/"
    assert "make demo" in readme and "make test" in readme
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (ROOT / link).exists()]
    assert missing == []


def test_the_changelog_names_the_version_being_built() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    headings = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings and headings[0] == version
