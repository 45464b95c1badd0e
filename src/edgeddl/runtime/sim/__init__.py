"""The simulated fleet: the reference loop, its exchanges on the virtual clock, checkpoints."""
