"""The library's version: one place, read by the package, its metadata and its checkpoints."""

__version__ = "0.2.0.dev0"
