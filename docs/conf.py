"""Sphinx configuration of the numpyro-nnef documentation (``make docs``).

Pages are MyST markdown; the notebooks (docs/notebooks links to ../notebooks) are rendered from
their stored outputs and never executed here (``make notebooks`` executes them). Every name in
``numpyro_nnef.__all__`` must have an API reference entry with a docstring: a missing one is a
warning, which ``-W`` makes an error.
"""

from __future__ import annotations

import inspect
import re

import numpyro_nnef

project = "numpyro-nnef"
author = "numpyro-nnef contributors"
release = version = numpyro_nnef.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "off"
exclude_patterns = ["_build", "notebooks/.ipynb_checkpoints"]
suppress_warnings = ["mystnb.unknown_mime_type"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"numpyro-nnef {release}"


# Docstrings are written as plain text with math-like notation (|x|, A_+, F^-1, *shape): outside
# ``literals`` and :roles:`...`, escape the characters that reStructuredText would read as
# substitutions, references or emphasis.
_LITERAL = re.compile(r"(``.*?``|:[a-z:]+:`[^`]*`)")
_PLAIN_TEXT_MARKUP = re.compile(r"\||(?<!\*)\*(?!\*)|(?<=\w)_(?!\w)")


def escape_plain_text(app, what, name, obj, options, lines) -> None:
    """Escape |, lone * and trailing _ in numpyro_nnef docstrings (autodoc-process-docstring)."""
    if not name.startswith("numpyro_nnef"):
        return
    for i, line in enumerate(lines):
        pieces = _LITERAL.split(line)
        pieces[::2] = [_PLAIN_TEXT_MARKUP.sub(lambda m: "\\" + m.group(0), p)
                       for p in pieces[::2]]
        lines[i] = "".join(pieces)


def check_reference(app, env) -> None:
    """Warn (an error under -W) for every public name without a reference entry or a summary."""
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    documented = set(env.domaindata["py"]["objects"]) | {
        f"numpyro_nnef.{name}" for name in env.domaindata["py"]["modules"]}
    for name in numpyro_nnef.__all__:
        obj = getattr(numpyro_nnef, name)
        if f"numpyro_nnef.{name}" not in documented:
            logger.warning(f"numpyro_nnef.{name} is in __all__ but has no API reference entry")
        elif not isinstance(obj, str) and not (inspect.getdoc(obj) or "").strip():
            logger.warning(f"numpyro_nnef.{name} has no docstring (a one-line summary)")


def setup(app) -> None:
    app.connect("autodoc-process-docstring", escape_plain_text)
    app.connect("env-check-consistency", check_reference)
