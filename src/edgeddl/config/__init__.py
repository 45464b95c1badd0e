"""edgeddl.config layer (see shared/DESIGN.md)."""
