"""Paged KV cache: one block pool with reference counts and a content-hash prefix cache.

A branch owns a block table (a list of block ids); forking copies the table and adds a
reference to every block, so the shared prefix is stored once. A block with more than one
reference is copied before it is written (copy-on-write). Full blocks are registered by a
hash chain over their tokens so later requests with the same prefix reuse them; a free block
keeps its hash (and stays reusable) until it is handed out again, oldest-freed first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from apar_worker.types import BLOCK_SIZES


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than a caller asked for (the scheduler preempts)."""


class BlockPool:
    """Block ids, reference counts and the prefix-cache index; holds no tensors."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if block_size not in BLOCK_SIZES:
            raise ValueError(
                f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, not {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Free blocks in eviction order (first = evicted first). Cached blocks stay here too.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocksError("KV block pool exhausted")
        block, _ = self._free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            del self.hash_to_block[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self._free[block]  # a prefix-cache hit revives a free block
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        count = self.ref_counts[block] - 1
        if count < 0:
            raise RuntimeError(f"block {block} freed twice")
        self.ref_counts[block] = count
        if count == 0:
            self._free[block] = None

    def free_table(self, table: list[int]) -> None:
        # Release tail first so a request's last blocks are evicted before its shared prefix.
        for block in reversed(table):
            self.decref(block)
        table.clear()

    def lookup(self, block_hash: int) -> int | None:
        return self.hash_to_block.get(block_hash) if self.enable_prefix_caching else None

    def register(self, block: int, block_hash: int) -> None:
        if not self.enable_prefix_caching or block_hash in self.hash_to_block:
            return
        if self.block_hash[block] is not None:
            return
        self.hash_to_block[block_hash] = block
        self.block_hash[block] = block_hash


def chain_hash(prev: int | None, tokens: list[int]) -> int:
    """Hash of a full block given the hash of the block before it (content-addressed prefix)."""
    return hash((prev, tuple(tokens)))


class KVCache:
    """The tensors behind the pool: one [layers, 2, kv_heads, blocks, block_size, head_dim] buffer.

    Head-major blocks match the [kv_heads, tokens, head_dim] layout HF hands to attention:
    new K/V are written with one index_copy_ and a branch's context is read with one
    block-granular index_select (whole blocks are contiguous, far cheaper than per-slot
    gathers). One tensor for all layers lets copy-on-write copy a block in one operation.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.data = torch.zeros(
            (num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim), dtype=dtype, device=device
        )

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer, each [kv_heads, blocks, block_size, head_dim]."""
        kv = self.data[index]
        return kv[0], kv[1]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (src, dst) blocks for every layer: the data half of copy-on-write."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.data.device)
        dst = torch.tensor([d for _, d in pairs], device=self.data.device)
        self.data[:, :, :, dst] = self.data[:, :, :, src]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
