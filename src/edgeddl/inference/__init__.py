"""edgeddl.inference layer (see shared/DESIGN.md): communication-aware distributed inference."""
