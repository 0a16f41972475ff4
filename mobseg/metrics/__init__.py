"""mobseg.metrics."""
