"""`pip install .` ships every subpackage of amaml_ext (a subpackage missing from the packaging
config imports fine from the source tree, where the tests run, and fails only once installed)."""

import os
import tomllib

from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_packaged():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(ROOT, include=cfg["include"]))
    on_disk = {os.path.relpath(d, ROOT).replace(os.sep, ".")
               for d, _, files in os.walk(os.path.join(ROOT, "amaml_ext")) if "__init__.py" in files}
    assert "amaml_ext.data.images" in on_disk
    assert on_disk <= shipped, f"not packaged: {sorted(on_disk - shipped)}"
