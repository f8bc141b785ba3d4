"""Phase 2: sensitivity metrics, ranking, per-tensor statistics, plots, checkpoints and the
reduction of data shards, from calibration batches to scores.h5.
"""
