"""Phase runners; importing this package registers each with esa.runner."""

from esa.phases import baseline  # noqa: F401
