"""edgeddl.fleet layer (see shared/DESIGN.md)."""
