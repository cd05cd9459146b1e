"""The CNN in explicit NumPy: every layer's forward and backward written out by hand."""
