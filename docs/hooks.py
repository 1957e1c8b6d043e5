"""mkdocs hook: expands ``<!-- api: module -->`` in api.md into one mkdocstrings entry per name in the module's
``__all__``, read from the source without importing it (so the site builds without torch's optional extras)."""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"<!-- api: ([\w.]+) -->")


def public_names(module: str) -> list:
    """The names in ``module.__all__`` (a literal list in the module's source)."""
    base = os.path.join(ROOT, *module.split("."))
    path = os.path.join(base, "__init__.py") if os.path.isdir(base) else base + ".py"
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise ValueError(f"{path} defines no literal __all__")


def expand(markdown: str) -> str:
    """Replaces every marker with ``::: module.name`` blocks (an h3 heading each, in ``__all__`` order)."""
    return MARKER.sub(lambda m: "\n\n".join(f"::: {m.group(1)}.{name}\n    options:\n      heading_level: 3"
                                            for name in public_names(m.group(1))), markdown)


def on_page_markdown(markdown, page, config, files):  # noqa: ANN001, ANN201 (mkdocs hook signature)
    return expand(markdown) if MARKER.search(markdown) else markdown


try:  # griffe is there when mkdocstrings[python] is; the hook above works without it
    import griffe
except ImportError:  # pragma: no cover
    griffe = None

if griffe is not None:

    class ExamplesSection(griffe.Extension):
        """The docstrings title their doctest sections ``Example:``; griffe's Google parser renders only
        ``Examples:`` as code, so rename the title when the docstring is loaded (the source is unchanged)."""

        TITLE = re.compile(r"^(\s*)Example:(:?)\s*$", re.M)

        def on_instance(self, *, obj, **kwargs):  # noqa: ANN001, ANN201 (griffe extension signature)
            if obj.docstring is not None:
                obj.docstring.value = self.TITLE.sub(r"\1Examples:", obj.docstring.value)
