"""Aggregation rules (mean, median, trimmed mean, Krum, mixing, bucketing) and the robust
screen that applies them to devices' updates."""
