"""recon: reconstruct a black-box classifier's hidden training images."""

__version__ = "0.1.0"
