"""edgeddl.strategy layer (see shared/DESIGN.md)."""
