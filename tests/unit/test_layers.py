"""The layers hold (adr/0015): import-linter checks the contracts declared in
pyproject.toml — imports point down the layers, and the contract, the core and the
service do no I/O.

The sub-packages of ``topology_store`` live in the repository's top folders, linked
into ``src/topology_store/``; ``lint-imports`` walks that tree. The probe runs it on a
throwaway copy of the tree with one offending module added.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGE = ROOT / "src" / "topology_store"
FOLDERS = sorted(link.name for link in PACKAGE.iterdir() if link.is_symlink())
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def namespace_tree(where: Path, probe: str | None = None) -> Path:
    """``where/topology_store/<name>`` -> the repository folder of each sub-package;
    with ``probe``, the core is a folder of links plus a probe module of that text."""
    package = where / "topology_store"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for folder in FOLDERS:
        link = package / folder
        if probe is not None and folder == "core":
            link.mkdir()
            for module in (ROOT / folder).glob("*.py"):
                (link / module.name).symlink_to(module)
            (link / "_layer_probe.py").write_text(probe)
        else:
            link.symlink_to(ROOT / folder, target_is_directory=True)
    return where


def run_contracts(tmp_path: Path, probe: str | None = None) -> subprocess.CompletedProcess[str]:
    """lint-imports over the installed tree, or over a copy with a probe module."""
    env = dict(os.environ)
    if probe is not None:
        env["PYTHONPATH"] = str(namespace_tree(tmp_path, probe))
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_every_layer_contract_is_kept(tmp_path: Path) -> None:
    done = run_contracts(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    contracts = PYPROJECT["tool"]["importlinter"]["contracts"]
    assert f"{len(contracts)} kept, 0 broken" in done.stdout


def test_the_contract_sees_an_upward_import(tmp_path: Path) -> None:
    """The check is not vacuous: a core module importing the CLI breaks it."""
    done = run_contracts(tmp_path, '"""Probe."""\nimport sqlalchemy\n\nimport topology_store.cli.main\n')
    assert done.returncode != 0
    assert "topology_store.core._layer_probe -> topology_store.cli.main" in done.stdout
    assert "topology_store.core._layer_probe -> sqlalchemy" in done.stdout


def test_the_tree_is_every_package_setuptools_installs() -> None:
    """Each top folder that is a package (but tests, bench) is linked into the namespace,
    and setuptools installs each of them."""
    top_packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert set(FOLDERS) == top_packages
    for folder in FOLDERS:
        assert (PACKAGE / folder).resolve() == ROOT / folder
    installed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert {f"topology_store.{folder}" for folder in FOLDERS} <= installed
