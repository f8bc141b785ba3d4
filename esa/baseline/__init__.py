"""Phase 1: perplexity, NLL and token accuracy of the unmodified model.
"""
