"""edgeddl.strategy.split.maths."""
