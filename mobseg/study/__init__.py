"""mobseg.study."""
