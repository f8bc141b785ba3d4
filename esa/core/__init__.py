"""The ground every layer stands on: user errors, logging and progress, atomic file writes,
the cache folder, provenance, and stop requests (pre-emption signals). No esa imports above it.
"""
