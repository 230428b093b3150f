"""Reports: matplotlib figures (object-oriented API on an Agg canvas; the global backend is never switched) and
self-contained HTML pages."""

from .html import Figure, Section, table_html, write_report

__all__ = ["Figure", "Section", "table_html", "write_report"]
