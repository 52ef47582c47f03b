"""Packaging: the license (SPDX, with its file), metadata (classifiers, numpy as a core
dependency), one version, ``py.typed``, and an sdist that carries what its own tests need
(tests/ with conftest, strategies and subfolders; docs/ for tests/test_docs.py).

The sdist and wheel are built with the installed setuptools (no build isolation, no network) from
a copy of the tree, so nothing is written into the checkout.
"""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import attnkit

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()  # read as text: tomllib is 3.11+, we support 3.10
JUNK = ("__pycache__", ".hypothesis", ".pytest_cache", ".ruff_cache", ".venv", "build", "dist", ".git")


def _tree_files(folder: str) -> set[str]:
    """Files under ROOT/folder, as sdist-relative paths, without caches and bytecode."""
    out = set()
    for p in (ROOT / folder).rglob("*"):
        rel = p.relative_to(ROOT)
        if p.is_file() and not any(part in JUNK for part in rel.parts) and p.suffix not in (".pyc", ".pyo"):
            out.add(rel.as_posix())
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist member names, sdist PKG-INFO, wheel member names, wheel METADATA)."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src-copy"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*JUNK, "*.egg-info", "*.pyc"))
    out = tmp / "out"
    code = ("import sys; from setuptools import build_meta as b; out = sys.argv[1]; "  # (build_sdist edits sys.argv)
            "s = b.build_sdist(out); w = b.build_wheel(out); print('BUILT', s, w)")
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SetuptoolsDeprecationWarning" not in done.stderr, done.stderr[-3000:]
    sdist_name, wheel_name = done.stdout.split("BUILT ")[-1].split()
    with tarfile.open(out / sdist_name) as tar:
        top = sdist_name.removesuffix(".tar.gz")
        names = {m.name.removeprefix(top + "/") for m in tar.getmembers() if m.isfile()}
        pkg_info = email.message_from_bytes(tar.extractfile(f"{top}/PKG-INFO").read())
    with zipfile.ZipFile(out / wheel_name) as whl:
        wheel_names = set(whl.namelist())
        meta_name = next(n for n in wheel_names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(whl.read(meta_name))
    return names, pkg_info, wheel_names, metadata


def _project_table() -> str:
    return re.search(r"^\[project\]\n(.*?)(?=^\[)", PYPROJECT, re.M | re.S).group(1)


def test_license_file_and_spdx_expression(built):
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    project = _project_table()
    assert re.search(r'^license = "MIT"$', project, re.M)  # SPDX, not the deprecated {text = "MIT"} table
    assert re.search(r'^license-files = \["LICENSE"\]$', project, re.M)
    requires = re.search(r"^requires = \[(.*)\]", PYPROJECT, re.M).group(1)
    assert int(re.search(r'"setuptools>=(\d+)"', requires).group(1)) >= 77, requires  # PEP 639 support
    _, pkg_info, _, metadata = built
    for meta in (pkg_info, metadata):
        assert meta["License-Expression"] == "MIT" and meta.get_all("License-File") == ["LICENSE"]
        assert not any(c.startswith("License ::") for c in meta.get_all("Classifier"))  # SPDX replaces them


def test_metadata_has_classifiers_and_numpy(built):
    """Project URLs are left out until the project has a public home (no invented addresses)."""
    _, _, _, metadata = built
    classifiers = metadata.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and len(classifiers) >= 5
    assert not metadata.get_all("Project-URL")
    core = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(re.split(r"[<>=!~ ]", r)[0] for r in core) == ["numpy", "torch"], core  # torch warns without numpy
    assert not any(r.startswith("numpy") and "extra ==" in r for r in metadata.get_all("Requires-Dist"))  # not twice


def test_version_is_written_once(built):
    project = _project_table()
    assert not re.search(r"^version\s*=", project, re.M) and re.search(r'^dynamic = \["version"\]', project, re.M)
    assert 'version = { attr = "attnkit._version.__version__" }' in PYPROJECT
    assigned = [p.relative_to(ROOT).as_posix() for p in (ROOT / "src").rglob("*.py")
                if re.search(r"^__version__\s*=", p.read_text(), re.M)]
    assert assigned == ["src/attnkit/_version.py"]
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", attnkit.__version__)
    _, pkg_info, _, metadata = built
    assert pkg_info["Version"] == metadata["Version"] == attnkit.__version__


def test_py_typed_and_gitignore():
    assert (ROOT / "src" / "attnkit" / "py.typed").is_file()
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "build/" in ignored and "dist/" in ignored


def test_sdist_carries_its_tests_and_docs(built):
    names = built[0]
    for required in ("LICENSE", "README.md", "pyproject.toml", "constraints-cpu.txt", "src/attnkit/py.typed",
                     "tests/conftest.py", "tests/strategies.py", "tests/__init__.py", "tests/cli/test_show.py",
                     "tests/test_docs.py", "docs/index.md"):
        assert required in names, required
    missing = (_tree_files("tests") | _tree_files("docs")) - names
    assert not missing, sorted(missing)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_files(built):
    _, _, wheel_names, _ = built
    assert {"attnkit/py.typed", "attnkit/__main__.py", "attnkit/_version.py"} <= wheel_names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel_names)
    assert not any(n.startswith(("tests/", "docs/")) for n in wheel_names)


def test_readme_install_names_the_cpu_build():
    """README's install section gives `pip install .` and, next to it, the CPU form with the pin."""
    readme = (ROOT / "README.md").read_text()
    install = re.search(r"^## Install.*?(?=^## )", readme, re.M | re.S).group(0)
    assert "pip install .  " in install and "pip install -c constraints-cpu.txt ." in install
    assert "--index-url https://download.pytorch.org/whl/cpu" in install  # the CPU wheel off this project's index
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints-cpu.txt").read_text(), re.M).group(1)
    assert f"torch=={pin}" in install
