"""gradcond: see, and change, how gradients flow through deep networks."""

__version__ = "0.1.0"
