"""The NTK algorithms of arXiv 2206.08720, written against :mod:`ntkcore.protocol`."""
