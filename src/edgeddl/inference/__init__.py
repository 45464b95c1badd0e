"""Distributed inference: where to split a trained model across devices, and running it."""
