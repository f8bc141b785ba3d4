"""Phase runners; importing this package registers each with esa.runner."""

from esa.phases import baseline, perturb, profile  # noqa: F401
