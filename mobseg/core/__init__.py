"""mobseg.core."""
