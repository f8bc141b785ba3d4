"""Sensitivity metrics: importing this package registers every built-in metric."""

from esa.metrics.base import (  # noqa: F401
    Metric,
    MetricOptions,
    MetricResult,
    canonical_name,
    get_metric,
    metric_names,
    register,
)

# Each module registers its metrics on import (see esa/metrics/base.py).
# Metric modules are imported here as they land.
from esa.metrics import curvature, gradient, magnitude  # noqa: F401,E402
from esa.metrics import activation, super_weight  # noqa: F401,E402
