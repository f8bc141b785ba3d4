"""Offline analysis of finished ESA jobs: job table, overlap, stability, ΔPPL, report.

Reads only result files (JSON, CSV, HDF5 through h5py) and never imports torch, so it runs
on a login node or a laptop with the run folder copied over. Entry points:
``python -m analysis RUN`` and :func:`build_report`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_report", "collect_jobs"]


def __getattr__(name: str) -> Any:
    # Lazy: `esa --help` builds the `esa analyze` parser from analysis.__main__ and should not
    # pay for pandas/scipy/matplotlib until a report is actually built.
    if name == "build_report":
        from analysis.report import build_report

        return build_report
    if name == "collect_jobs":
        from analysis.collect import collect_jobs

        return collect_jobs
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
