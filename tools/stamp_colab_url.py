"""Write the repository's git URL into the six notebooks' setup cells (their REPO_URL form field, which Colab shows),
so that a notebook opened from GitHub in Colab clones this repository. The one place to set it is pyproject.toml,
[project.urls] Repository; after changing it, run `make colab-url` and commit the notebooks
(tests/test_notebooks.py checks that the cells and pyproject.toml agree). Needs Python 3.11+ (tomllib)."""

import argparse
import json
import re
from pathlib import Path

import nbformat
import tomllib

ROOT = Path(__file__).resolve().parents[1]
FIELD = re.compile(r"^REPO_URL = .*$", re.MULTILINE)


def repository_url(root: Path = ROOT) -> str:
    """The git URL in pyproject.toml's [project.urls] Repository ("" while it is not set)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return project.get("urls", {}).get("Repository", "")


def stamp(root: Path = ROOT) -> list[Path]:
    """Set REPO_URL in each notebook's setup cell (its first code cell) to repository_url(root); return the
    notebooks that changed."""
    line = f'REPO_URL = {json.dumps(repository_url(root))}  # @param {{type:"string"}}'
    changed = []
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        setup = next(c for c in nb.cells if c.cell_type == "code")
        source, found = FIELD.subn(lambda _: line, setup.source)
        if found != 1:
            raise SystemExit(f"{path}: its setup cell has {found} REPO_URL lines, not one")
        if source != setup.source:
            setup.source = source
            nbformat.write(nb, path)
            changed.append(path)
    return changed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = parser.parse_args()
    changed = stamp(args.root)
    print(f"REPO_URL = {repository_url(args.root)!r} in the setup cells; changed: "
          f"{', '.join(p.name for p in changed) or 'none'}")
