"""kvc: kernel modules via containers."""

__version__ = "0.1.0"
