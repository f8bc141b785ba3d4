"""What a job is, torch-free: the typed manifest and plan (every default once), the registry of
names (metrics, perturbations, controls, phases), weight names, and the generated JSON Schemas.
"""
