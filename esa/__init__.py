"""ESA: extreme sensitivity analysis of causal language models."""

__version__ = "0.1.0"
