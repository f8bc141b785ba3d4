"""Running one job as several ranks (torch.distributed, FSDP2): launch environment, the sharded
model, and splitting the work over ranks so that a sharded run equals an unsharded one.
"""
