"""Training and held-out text: `sources` (corpora as documents, read lazily) and `blocks` (documents ->
packed token blocks, the held-out split)."""

from linearize.data.blocks import Blocks, build_blocks, file_blocks, is_held_out, split_documents
from linearize.data.sources import Document, load_texts

__all__ = ["Blocks", "Document", "build_blocks", "file_blocks", "is_held_out", "load_texts", "split_documents"]
