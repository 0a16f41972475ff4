"""mobseg.data."""
