"""The maps cannot go stale (adr/0015): the README's layout table names every installed
folder, each package's docstring names every module it holds (and none it does not),
and every page the README links to exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = sorted(link.name for link in (ROOT / "src" / "topology_store").iterdir() if link.is_symlink())
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_layout_table_names_every_installed_folder() -> None:
    rows = set(re.findall(r"^\| `([a-z_]+)/` \|", README, flags=re.M))
    assert rows == set(FOLDERS)


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_package_docstring_lists_exactly_its_modules(folder: str) -> None:
    package = ROOT / folder
    docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8"))) or ""
    modules = {p.stem for p in package.glob("*.py") if not p.name.startswith("_")}
    modules |= {p.parent.name for p in package.glob("*/__init__.py")}
    listed = set(re.findall(r"^- ``([a-z_]+)``", docstring, flags=re.M))
    assert listed == modules, f"{folder}/__init__.py lists {sorted(listed)}; the folder holds {sorted(modules)}"


def test_every_page_the_readme_links_to_exists() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / target).exists(), target
