"""mobseg.nnunet."""
