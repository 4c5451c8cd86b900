"""Adapter-only checkpoints on orbax: save, load, inspect, and step checkpoints for training.

See :func:`save_adapters`, :func:`load_adapters`, :class:`AdapterCheckpointManager` and
``python -m jadapters inspect PATH``.
"""

from jadapters.checkpoint.io import abstract_adapters as abstract_adapters
from jadapters.checkpoint.io import adapter_metadata as adapter_metadata
from jadapters.checkpoint.io import load_adapters as load_adapters
from jadapters.checkpoint.io import read_adapter_metadata as read_adapter_metadata
from jadapters.checkpoint.io import save_adapters as save_adapters
from jadapters.checkpoint.manager import AdapterCheckpointManager as AdapterCheckpointManager
from jadapters.checkpoint.manager import RestoredCheckpoint as RestoredCheckpoint
from jadapters.checkpoint.metadata import FORMAT_VERSION as FORMAT_VERSION

__all__ = [
    "FORMAT_VERSION",
    "AdapterCheckpointManager",
    "RestoredCheckpoint",
    "abstract_adapters",
    "adapter_metadata",
    "load_adapters",
    "read_adapter_metadata",
    "save_adapters",
]
