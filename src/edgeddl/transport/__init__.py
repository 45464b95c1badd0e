"""edgeddl.transport layer (see shared/DESIGN.md)."""
