"""The job layer: plans -> manifests (plans.py), run-folder paths (paths.py), submission and status.

`jobs` builds and schedules manifests; it never computes a score (that is `esa`'s job).
"""
