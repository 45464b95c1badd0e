"""Gradient compression: pure compressors, error-feedback memories and the wire codec."""
