"""Offline analysis of finished ESA jobs: job table, overlap, stability, ΔPPL, report.

Reads only result files (JSON, CSV, HDF5 through h5py) and never imports torch, so it runs
on a login node or a laptop with the run folder copied over. Entry points:
``python -m analysis RUN`` and :func:`build_report`.
"""

from __future__ import annotations

from analysis.collect import collect_jobs
from analysis.report import build_report

__all__ = ["build_report", "collect_jobs"]
