"""Rows of tensors on disk: one row per training sequence, kept as safetensors shards with a manifest.

A `ShardStore` holds, for rows 0 .. rows - 1, the same named tensors per row (a block's input hidden
states, or a layer's input and softmax output). Rows are grouped into shards of `rows_per_shard`
consecutive rows, `shard_00012.safetensors`, each written whole and atomically: a shard file that exists
is complete, so a killed writer loses at most the shard it was writing and a resumed one writes only the
missing shards. Shards are also the unit of work when several ranks fill a store. `manifest.json` says
what the store holds; a store whose manifest disagrees with what is asked for is started over.
Reading a row reads only that row's slice of each tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from linearize.checkpoint import DTYPES, atomic_save_tensors, atomic_write_text
from linearize.errors import LinearizeError

MANIFEST = "manifest.json"


class ShardStore:
    def __init__(self, directory: Path, rows: int, rows_per_shard: int, dtype: str, what: dict[str, Any]):
        self.directory = directory
        self.rows = rows
        self.rows_per_shard = rows_per_shard
        self.dtype = DTYPES[dtype]
        self.manifest = {"rows": rows, "rows_per_shard": rows_per_shard, "dtype": dtype, **what}

    def open(self) -> ShardStore:
        """Create the directory and manifest (main rank; others wait at a barrier before writing shards)."""
        path = self.directory / MANIFEST
        if path.is_file() and json.loads(path.read_text()) != self.manifest:
            shutil.rmtree(self.directory)  # written for other data or another layout: start over
        self.directory.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            atomic_write_text(path, json.dumps(self.manifest, indent=1))
        return self

    @property
    def shards(self) -> int:
        return -(-self.rows // self.rows_per_shard)

    def rows_of(self, shard: int) -> range:
        return range(shard * self.rows_per_shard, min((shard + 1) * self.rows_per_shard, self.rows))

    def path(self, shard: int) -> Path:
        return self.directory / f"shard_{shard:05d}.safetensors"

    def has(self, shard: int) -> bool:
        return self.path(shard).is_file()

    def write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        """All rows of `shard`: each tensor [rows in the shard, ...]."""
        rows = len(self.rows_of(shard))
        for name, tensor in tensors.items():
            if tensor.shape[0] != rows:
                raise ValueError(f"shard {shard} of {self.directory} holds {rows} rows, '{name}' has {tensor.shape[0]}")
        atomic_save_tensors({k: v.to(self.dtype) for k, v in tensors.items()}, self.path(shard))

    def read(self, rows: list[int], names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The given rows (stacked on dim 0, in that order) of every tensor, or of `names`."""
        from safetensors import safe_open

        parts: dict[str, list[torch.Tensor]] = {}
        for row in rows:
            shard, offset = divmod(row, self.rows_per_shard)
            path = self.path(shard)
            if not path.is_file():
                raise LinearizeError(f"stored activations '{path}' are missing: re-run to rebuild them")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in names or handle.keys():
                        parts.setdefault(name, []).append(handle.get_slice(name)[offset : offset + 1])
            except LinearizeError:
                raise
            except Exception as err:  # safetensors' own error types for a truncated or garbled file
                raise LinearizeError(f"stored activations '{path}' are corrupt ({err}): delete the file and re-run "
                                     "to rebuild it") from err
        return {name: torch.cat(tensors) for name, tensors in parts.items()}
