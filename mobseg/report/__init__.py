"""mobseg.report."""
