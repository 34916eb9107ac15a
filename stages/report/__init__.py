"""The report stage: the visual protocol (PROTOCOL.md section 6) as figures and one page.

``stage`` selects the compared settings and writes the page; ``panels`` registers each
figure of a section in page order; ``figures`` holds the ``plot_*(..., ax=None)`` functions.
"""
from .stage import ReportData, ReportResult, is_done, run_report, select_rows

__all__ = ["ReportData", "ReportResult", "is_done", "run_report", "select_rows"]
