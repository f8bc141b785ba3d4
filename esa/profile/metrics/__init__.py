"""Sensitivity metrics: the Metric interface (base.py) and one module per family of metrics.

The names, aliases and implementing classes are listed once, in esa.spec.names.METRICS.
"""

from esa.profile.metrics.base import Metric, MetricOptions, MetricResult, get_metric  # noqa: F401
