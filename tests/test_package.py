"""The package as a user gets it: a wheel with the right metadata, installed apart from the checkout, that runs the
quickstart; a README whose links work on a package index; the version in one place.

The wheel is the one ``make test`` builds (``SER_WHEEL=dist/ser_plugin-<version>-py3-none-any.whl``), or, when that
variable is not set, one built here from a copy of the sources in tmp (``python -m build --wheel --no-isolation``,
so nothing is downloaded and nothing is written into the checkout).
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import ser_plugin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["ser_plugin", "setup.cfg", "pyproject.toml", "README.md", "LICENSE"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:  # noqa: ANN001
    given = os.environ.get("SER_WHEEL")
    if given:
        assert os.path.isfile(given), f"SER_WHEEL={given} does not exist"
        return given
    pytest.importorskip("build", reason="the build package is not installed (pip install -e '.[test]')")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (whl,) = [p for p in os.listdir(out) if p.endswith(".whl")]
    return str(out / whl)


def _metadata(wheel: str) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(z.read(name))


def test_wheel_metadata(wheel):  # noqa: ANN001
    meta = _metadata(wheel)
    assert meta["Name"] == "ser_plugin" and meta["Version"] == ser_plugin.__version__
    assert meta["License"] == "MIT" or meta["License-Expression"] == "MIT"
    assert meta["Requires-Python"] == ">=3.9"
    assert meta["Author"]
    classifiers = meta.get_all("Classifier")
    assert "Programming Language :: Python :: 3.9" in classifiers and "Typing :: Typed" in classifiers
    requires = meta.get_all("Requires-Dist")
    runtime = sorted(r.split(">")[0].split("=")[0] for r in requires if "extra ==" not in r)
    assert runtime == ["einops", "kornia", "torch"], runtime
    extras = set(meta.get_all("Provides-Extra"))
    assert {"timm", "hf", "lightning", "adapters", "demo", "docs", "test"} <= extras
    assert meta.get_content_type() == "text/plain" and meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().strip().startswith("# ser_plugin"), "the long description is not the README"
    for url in meta.get_all("Project-URL") or []:
        assert url.split(", ", 1)[1].startswith("https://"), url
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    assert "ser_plugin/py.typed" in names
    assert not [n for n in names if n.split("/")[0] not in ("ser_plugin",) and ".dist-info/" not in n], names


def test_wheel_installs_apart_from_the_checkout_and_runs_the_quickstart(wheel, tmp_path):  # noqa: ANN001
    """pip install --no-deps --target <tmp> (torch and the rest come from this environment: nothing is downloaded),
    then, from a directory outside the checkout with only the target on PYTHONPATH, the package imported is the
    installed one and the quickstart trains with it."""
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), wheel],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    quickstart = os.path.join(ROOT, "examples", "quickstart.py")
    probe = (
        "import runpy, sys, ser_plugin\n"
        f"assert ser_plugin.__file__.startswith({str(target)!r}), ser_plugin.__file__\n"
        f"assert not ser_plugin.__file__.startswith({ROOT + os.sep!r})\n"
        "print('ser_plugin from', ser_plugin.__file__)\n"
        f"sys.argv = [{quickstart!r}, '--steps', '3', '--batch', '8']\n"
        f"runpy.run_path({quickstart!r}, run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(target)
    work = tmp_path / "elsewhere"
    work.mkdir()
    run = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"ser_plugin from {target}" in run.stdout
    assert re.search(r"L_equiv", run.stdout + run.stderr), run.stdout[-2000:]
    assert not os.listdir(work), "the quickstart wrote into its working directory"


def test_installed_wheel_has_no_checkout_only_imports(wheel, tmp_path):  # noqa: ANN001
    """Every module of the installed package imports without the checkout (no import of tests/, examples/, benchmarks/)."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), wheel], check=True)
    code = ("import pkgutil, importlib, ser_plugin\n"
            "mods = [m.name for m in pkgutil.walk_packages(ser_plugin.__path__, 'ser_plugin.')]\n"
            "skip = {'ser_plugin.integrations.lightning'}\n"  # needs the lightning extra, imported only on request
            "[importlib.import_module(m) for m in mods if m not in skip]\n"
            "print(len(mods))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.strip()) >= 15


# ---------------------------------------------------------------------------------------------- README, version
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_readme_is_a_front_page():
    lines = README.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines (at most 150)"
    first_screen = "\n".join(lines[:40])
    for must in ("make demo", "make test", "pip install", "attach_ser(", "--index-url https://download.pytorch.org/whl/cpu"):
        assert must in first_screen, f"{must!r} is not on the README's first screen"
    assert "@inproceedings{" in README and "ICLR" in README
    assert "## Evidence" in README


def test_readme_links_work_on_a_package_index():
    """The README is the long description on an index, where relative links are dead: links are absolute or absent,
    and every repository path it names in backticks exists."""
    links = re.findall(r"\]\(([^)]+)\)", README) + re.findall(r'(?:href|src)="([^"]+)"', README)
    relative = [u for u in links if not re.match(r"https?://", u)]
    assert not relative, f"relative links in README.md: {relative}"
    for path in re.findall(r"`((?:docs|examples|benchmarks|tests|ser_plugin)/[\w./-]*)`", README):
        assert os.path.exists(os.path.join(ROOT, path)), f"README.md names {path}, which does not exist"
    for path in ("LICENSE", "CHANGELOG.md"):
        assert f"`{path}`" in README and os.path.exists(os.path.join(ROOT, path))


def test_version_is_stated_once():
    """ser_plugin.__version__ is the one place: setup.cfg reads it, and no other packaging or docs file repeats it."""
    cfg = open(os.path.join(ROOT, "setup.cfg"), encoding="utf-8").read()
    assert "version = attr: ser_plugin.__version__" in cfg
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:\.dev\d+|rc\d+)?", ser_plugin.__version__)
    for rel in ("setup.cfg", "pyproject.toml", "README.md", "mkdocs.yml", "docs/getting-started.md"):
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        assert ser_plugin.__version__ not in text, f"{rel} repeats the version {ser_plugin.__version__}"


def test_license_matches_the_declared_licence():
    text = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    assert re.search(r"^license = MIT$", open(os.path.join(ROOT, "setup.cfg"), encoding="utf-8").read(), re.M)
