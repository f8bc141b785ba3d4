"""Text to token windows: the built-in corpus, documents -> windows (cached), and the seed-drawn,
sharded calibration subsets of phase 2.
"""
