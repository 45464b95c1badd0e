"""Runtimes: what carries a strategy's steps, simulated (`sim`) or on real processes
(`fleet`). They are typed against `strategy.base` and never import a concrete strategy."""
