"""Sphinx configuration of the documentation site.

The guides (Markdown, MyST), the API reference (autodoc, Google-style docstrings) and the benchmark pages, generated
from ``benchmarks/results`` at every build so they quote the committed measurements.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

project = "lightning-mergeguard"
author = "lightning-mergeguard developers"
copyright = "2026, lightning-mergeguard developers"
release = version = "0.1.0"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
html_theme = "furo"
html_title = "lightning-mergeguard"
html_static_path = ["_static"]

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# A reference to something of this library that does not exist fails the build (warnings are errors in CI);
# references into torch, Lightning, transformers and the standard library are not checked (no network here).
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!lightning_mergeguard\b).*")]
suppress_warnings = ["myst.header"]

BENCHMARKS = DOCS / "benchmarks" / "generated"


def _slug(title: str) -> str:
    name = re.search(r"`benchmarks/(\w+)\.py( --grid)?", title) or re.search(r"`make (\w+)`", title)
    if not name:
        return re.sub(r"\W+", "_", title.lower()).strip("_")[:40]
    return name.group(1) + ("_grid" if name.lastindex and name.lastindex > 1 and name.group(2) else "")


def write_benchmark_pages(app=None) -> list[str]:
    """One page per section of ``benchmarks/readme_tables.py``, its plots copied beside it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import readme_tables

    shutil.rmtree(BENCHMARKS, ignore_errors=True)
    BENCHMARKS.mkdir(parents=True)
    names = []
    for title, body in readme_tables.sections():
        for image in re.findall(r"\]\(((?:benchmarks/results|docs/_static)/[^)]+\.png)\)", body):
            shutil.copy(ROOT / image, BENCHMARKS / Path(image).name)
        body = re.sub(r"\]\((?:benchmarks/results|docs/_static)/([^)]+\.png)\)", r"](\1)", body)
        slug = _slug(title)
        (BENCHMARKS / f"{slug}.md").write_text(f"# {title}\n\n{body}\n", encoding="utf-8")
        names.append(slug)
    (BENCHMARKS / "index.md").write_text(
        "# All measurements\n\n```{toctree}\n:maxdepth: 1\n\n" + "\n".join(names) + "\n```\n", encoding="utf-8"
    )
    return names


def _exists(target: str) -> bool:
    """Whether a dotted ``lightning_mergeguard`` path names something that exists (a module or an attribute)."""
    import importlib

    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def literal_for_internals(app, env, node, contnode):
    """Render a reference to an internal object that exists as code; leave a broken one to fail the build.

    Internal objects are documented in their modules, not in the API pages.
    """
    target = node.get("reftarget", "")
    if node.get("refdomain") == "py" and target.startswith("lightning_mergeguard") and _exists(target):
        return contnode
    return None


def setup(app):
    """Generate the benchmark pages and resolve references to internal objects."""
    app.connect("builder-inited", write_benchmark_pages)
    app.connect("missing-reference", literal_for_internals)
