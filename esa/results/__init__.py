"""What a job leaves behind, torch-free: the run-folder layout, typed result records, scores.h5,
CSV exports, overlap and stability statistics, and the one answer to "is this job done?".
"""
