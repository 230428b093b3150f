"""Griffe extension: render Sphinx cross-reference roles (``:func:`x` ``) in docstrings as inline code.

The docstrings use reST roles such as ``:func:`fit``` and ``:class:`~gradcond.graph.CoBStructure```; Markdown would
show the role name verbatim. The role is dropped and the target kept as code (a leading ``~`` keeps the last
component only, as Sphinx does). No link is made: targets may be private modules the reference does not render.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const|ref):`(~?)([^`]+)`")


def _strip(text: str) -> str:
    return _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


class StripSphinxRoles(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = _strip(obj.docstring.value)
