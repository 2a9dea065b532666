"""The on-disk format: typed trees, safetensors I/O, checksums and the manifest.

Nothing in this package imports an ML framework: tensors reach it as :class:`TensorBlob`
objects made by a codec, and leave it through a codec chosen by the tensor's ``lib`` tag.
The format itself is specified in ``docs/format.md``.
"""

from runstate.format.manifest import FORMAT_NAME, FORMAT_VERSION, Manifest, TensorEntry
from runstate.format.tensors import TensorBlob, TensorCodec
from runstate.format.tree import StatefulState

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Manifest",
    "StatefulState",
    "TensorBlob",
    "TensorCodec",
    "TensorEntry",
]
