"""edgeddl.runtime."""
