"""mobseg: segmentation with structured, trustworthy uncertainty on nnU-Net v2."""

__version__ = "0.1.0"
