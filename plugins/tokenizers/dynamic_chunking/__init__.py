"""`dynamic_chunking`: DC-DiT (arXiv 2603.06351) as a tokenizer plugin.

Encoder -> router -> chunk -> (any backbone) -> de-chunk -> decoder, with the backbone running on
packed variable-length `Tokens`. Importing this package registers the tokenizer, its routers and its
de-chunkers; `official` imports and exports AMD-AGI/DynamicChunkingDiT checkpoints; `upcycle` makes a
DC-DiT from a trained DiT (``train.extension = @upcycling()``).
"""
from . import dechunk, routers, upcycle  # noqa: F401  (registration)
from .dechunk import DECHUNKERS
from .official import load_official_dcdit, to_official_dcdit
from .routers import ROUTERS
from .tokenizer import ChunkState, DynamicChunking
from .upcycle import Upcycling

__all__ = ["DynamicChunking", "ChunkState", "ROUTERS", "DECHUNKERS", "load_official_dcdit", "to_official_dcdit",
           "Upcycling"]
