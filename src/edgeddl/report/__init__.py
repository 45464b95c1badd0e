"""edgeddl.report layer (see shared/DESIGN.md)."""
