"""Reports: matplotlib figures (Agg) and self-contained HTML pages."""

from .html import Figure, Section, table_html, write_report

__all__ = ["Figure", "Section", "table_html", "write_report"]
