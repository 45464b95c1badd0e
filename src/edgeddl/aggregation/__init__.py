"""edgeddl.aggregation."""
