"""edgeddl.runtime.fleet."""
