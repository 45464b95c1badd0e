"""edgeddl.runtime.sim."""
