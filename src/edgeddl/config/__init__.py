"""Typed scenario configs: strict TOML loading, `--set`, one-line errors (no torch here)."""
