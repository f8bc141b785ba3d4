"""Phase 3: in-place perturbations with bit-exact restore, targets, matched controls, significance,
plots, and planted super weights for positive controls.
"""
