"""MkDocs hook: render the pages' TeX to MathML when the site is built, so equations show without a network.

``pymdownx.arithmatex`` (generic mode) leaves ``<span class="arithmatex">\\(...\\)</span>`` and
``<div class="arithmatex">\\[...\\]</div>`` in every page; a browser would need MathJax or KaTeX from a CDN to
typeset them, and a site opened from disk (``file://``) offline showed raw TeX. Here each one is converted to
MathML with ``latex2mathml`` (pure Python, from the ``docs`` extra); browsers render MathML natively (Chromium 109+,
Firefox, Safari), so the built site needs no script and no network. A formula the converter cannot handle fails the
build (naming the page and the TeX) instead of showing raw TeX.
"""

from __future__ import annotations

import html
import re

_MATH = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)
_DELIMS = {"\\(": "\\)", "\\[": "\\]", "$$": "$$", "$": "$"}


def _tex(body: str) -> tuple[str, bool]:
    """(TeX without its delimiters, display?) of an arithmatex element's escaped body."""
    text = html.unescape(body).strip()
    for left, right in _DELIMS.items():
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            return text[len(left):len(text) - len(right)].strip(), left in ("\\[", "$$")
    return text, False


def to_mathml(page_html: str, where: str = "page") -> str:
    """``page_html`` with every arithmatex element replaced by MathML (``<math display="inline|block">``)."""
    from latex2mathml.converter import convert

    def one(m):
        tex, display = _tex(m.group(2))
        display = display or m.group(1) == "div"
        try:
            mathml = convert(tex, display="block" if display else "inline")
        except Exception as exc:  # noqa: BLE001 -- any converter failure is a build error naming the formula
            raise ValueError(f"{where}: cannot render TeX {tex!r} to MathML ({type(exc).__name__}: {exc})") from None
        return f'<div class="math-block">{mathml}</div>' if display else mathml

    return _MATH.sub(one, page_html)


def on_page_content(html_text, page, config, files):  # noqa: ARG001 -- the MkDocs hook signature
    return to_mathml(html_text, page.file.src_path)
