"""Derives the package list from pyproject's `[tool.setuptools.package-dir]` map.

bertrec is one import namespace spread over the repository's top-level folders (`server/` is
`bertrec.server`, `proto/bertrec/v1/` is `bertrec.v1`, ...). setuptools cannot discover packages
through such a map, and a hand-kept list once left `bertrec.server.oip` out of every wheel. Here
every folder with an `__init__.py` below a mapped folder is a package, so a new subpackage is
shipped the moment it exists. Everything else about the build lives in pyproject.toml.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def mapped_packages(package_dir: dict[str, str], root: Path = ROOT) -> list[str]:
    """Every package under the mapped folders, named in the `bertrec` namespace."""
    found: set[str] = set()
    for name, folder in package_dir.items():
        base = root / folder
        for init in base.rglob("__init__.py"):
            parts = init.parent.relative_to(base).parts
            found.add(".".join((name, *parts)))
    return sorted(found)


def _package_dir() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(pyproject["tool"]["setuptools"]["package-dir"])


if __name__ == "__main__":
    setup(packages=mapped_packages(_package_dir()))
