"""The docs: every python block in README.md and docs/ runs (or says why not), the site builds with --strict,
every page is in the nav, the API reference covers every public name, and the troubleshooting page quotes real
messages.

How a block is kept from running: an HTML comment right above it, ``<!-- skip: next "the reason" -->`` (sybil's
skip directive; the reason is required and shows in the test report). Blocks fenced as anything but ``python``
(``bash``, ``yaml``, ``bibtex``) are not run.
"""

from __future__ import annotations

import ast
import glob
import importlib
import os
import re
import subprocess
import sys
import unittest

import pytest

sybil = pytest.importorskip("sybil", reason="sybil is not installed (pip install -e '.[test]')")
from docs_fixtures import namespace  # noqa: E402
from sybil import Document  # noqa: E402
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
FENCE = re.compile(r"^```(\S*)", re.M)
SKIP = re.compile(r"<!--\s*skip:\s*(\w+)(.*?)-->", re.S)
LANGUAGES = {"python", "bash", "yaml", "bibtex", "text"}


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _opening_fences(text: str) -> list:
    """Languages of the opening fences (every other fence closes a block)."""
    return [m.group(1) for i, m in enumerate(FENCE.finditer(text)) if i % 2 == 0]


@pytest.mark.parametrize("page", PAGES)
def test_page_code_blocks_run(page, tmp_path, monkeypatch):  # noqa: ANN001
    """Runs the page's python blocks in order, in one namespace, with the working directory in tmp_path."""
    monkeypatch.chdir(tmp_path)
    doc = Document.parse(os.path.join(ROOT, page), PythonCodeBlockParser(), SkipParser())
    doc.namespace.update(namespace())
    ran, skipped = 0, []
    for example in doc:
        try:
            example.evaluate()
        except unittest.SkipTest as why:
            skipped.append(str(why))
            continue
        ran += example.parsed is not None and not isinstance(example.parsed, tuple)
    blocks = _opening_fences(_read(page)).count("python")
    assert ran + len(skipped) == blocks, f"{page}: {blocks} python blocks, {ran} ran, {len(skipped)} skipped"
    assert all(r.strip() for r in skipped), f"{page}: a skipped block without a reason"


@pytest.mark.parametrize("page", PAGES)
def test_blocks_are_fenced_with_a_known_language_and_skips_give_a_reason(page):  # noqa: ANN001
    text = _read(page)
    langs = _opening_fences(text)
    assert set(langs) <= LANGUAGES, f"{page}: fences {sorted(set(langs) - LANGUAGES)}; use one of {sorted(LANGUAGES)}"
    for m in SKIP.finditer(text):
        action, reason = m.group(1), m.group(2).strip()
        assert action in ("next", "start", "end"), f"{page}: skip: {action}"
        if action != "end":
            assert re.fullmatch(r'"[^"]{10,}"', reason), f"{page}: 'skip: {action}' needs a quoted reason, got {reason!r}"


def test_the_training_step_blocks_really_run():
    """The mechanism above can fail: a page whose block raises makes the evaluation raise."""
    bad = "```python\nraise RuntimeError('this block ran')\n```\n"
    path = os.path.join(ROOT, "tests", "_doc_probe.md")
    doc = Document(bad, path)
    for region in PythonCodeBlockParser()(doc):
        doc.add(region)
    (example,) = list(doc)
    with pytest.raises(RuntimeError, match="this block ran"):
        example.evaluate()


# ----------------------------------------------------------------------------------------- site and API
def _nav_pages() -> list:
    import yaml

    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as f:
        cfg = yaml.load(f, Loader=yaml.BaseLoader)

    def walk(node):  # noqa: ANN001, ANN202
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for n in node:
                yield from walk(n)
        elif isinstance(node, dict):
            for v in node.values():
                yield from walk(v)

    return list(walk(cfg["nav"]))


def test_every_docs_page_is_in_the_nav():
    pages = {os.path.relpath(p, os.path.join(ROOT, "docs")) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)}
    nav = set(_nav_pages())
    assert pages == nav, f"not in the nav: {sorted(pages - nav)}; in the nav but missing: {sorted(nav - pages)}"
    for name in ("getting-started.md", "method.md", "configuration.md", "scale.md", "compatibility.md", "measuring.md",
                 "evidence.md", "demo.md", "study.md", "performance.md", "troubleshooting.md", "api.md"):
        assert name in nav, name
    integrations = {p for p in nav if p.startswith("integrations/")}
    assert len(integrations) == 10, integrations


API_MODULES = ["ser_plugin", "ser_plugin.integrations", "ser_plugin.integrations.launch", "ser_plugin.integrations.lightning",
               "ser_plugin.protocol"]


def test_api_reference_covers_every_public_name():
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        import hooks
    finally:
        sys.path.pop(0)
    page = _read("docs/api.md")
    expanded = hooks.expand(page)
    for mod in API_MODULES:
        assert f"<!-- api: {mod} -->" in page, f"docs/api.md has no entry list for {mod}"
        module = importlib.import_module(mod)
        assert hooks.public_names(mod) == list(module.__all__)
        for name in module.__all__:
            assert f"::: {mod}.{name}\n" in expanded, f"{mod}.{name} missing from the API reference"
            obj = getattr(module, name)
            if callable(obj):
                assert (obj.__doc__ or "").strip(), f"{mod}.{name} has no docstring for the API reference"


def test_docs_build_strict(tmp_path):
    """mkdocs build --strict: no broken link or anchor, no page outside the nav, no missing API target."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for mod in API_MODULES:
        for name in importlib.import_module(mod).__all__:
            assert f'id="{mod}.{name}"' in api, f"{mod}.{name} not rendered in the API reference"


# ----------------------------------------------------------------------------------------- troubleshooting
def _ser_plugin_source() -> str:
    return "\n".join(open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(ROOT, "ser_plugin", "**", "*.py"), recursive=True))


def test_troubleshooting_quotes_real_messages():
    text = _read("docs/troubleshooting.md")
    source = _ser_plugin_source()
    quoted = []
    for para in text.split("\n\n"):
        m = re.search(r"Messages?: (.*?)(?:Fix:|$)", para.replace("\n", " "))
        if m:
            quoted += re.findall(r"`([^`]+)`", m.group(1))
    assert len(quoted) >= 40, f"only {len(quoted)} quoted messages"
    for q in quoted:
        for piece in q.split("…"):
            assert piece.strip() == "" or piece in source, f"troubleshooting quotes {q!r}, but {piece!r} is in no message"


def test_troubleshooting_covers_every_module_that_raises():
    """Each module with a SERError has at least one of its messages quoted on the page."""
    text = re.sub(r"```.*?```", "", _read("docs/troubleshooting.md"), flags=re.S)  # code blocks out, spans stay
    pieces = [p for q in re.findall(r"`([^`]+)`", text) for p in q.split("…") if len(p.strip()) >= 12]
    for path in glob.glob(os.path.join(ROOT, "ser_plugin", "**", "*.py"), recursive=True):
        src = open(path, encoding="utf-8").read()
        if "raise SERError(" not in src or path.endswith("errors.py"):
            continue
        assert any(p in src for p in pieces), f"no message of {os.path.relpath(path, ROOT)} is on the troubleshooting page"


def test_hooks_module_parses_all_literally():
    tree = ast.parse(_read("ser_plugin/__init__.py"))
    assert any(isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__all__" for n in tree.body)
