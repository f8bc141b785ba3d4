"""The job layer: plans placed into run folders, executors, submission, status and the demo.

`jobs` builds and schedules manifests; it never computes a score (that is `esa`'s job).
"""
