"""The paged KV cache's block accounting: a free pool, reference counts, and the prefix cache.

A block is free (reference count 0) or held by the sequences that read it. With prefix caching, a
full block whose keys and values are computed is registered under a hash of its tokens and of every
token before it (the chain of its predecessors' hashes), so another sequence whose tokens begin the
same way takes it instead of recomputing it. A registered block that nobody holds stays cached,
evictable in least-recently-freed order, until the pool needs it. Only full blocks are shared
through the cache, and a sequence never writes to a block it shares: a write to a shared block
(a forked completion's last prompt block) copies it first (`Sequence.blocks` holds the copy).
"""

import collections


def block_hashes(tokens, block_size: int, count: int, extra=None, known=()) -> list[int]:
  """The hash chain of tokens' first `count` full blocks; `known` (a prefix of the chain) is reused."""
  hashes = list(known[:count])
  parent = hashes[-1] if hashes else hash(("root", extra))
  for i in range(len(hashes), count):
    parent = hash((parent, tuple(tokens[i * block_size: (i + 1) * block_size])))
    hashes.append(parent)
  return hashes


class BlockManager:
  """Which of the cache's num_blocks blocks are free, held (and how often), or cached by hash."""

  def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
    self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
    self.refs = [0] * num_blocks
    self._never_cached = collections.deque(range(num_blocks))  # free and registered under no hash
    self._evictable = collections.OrderedDict()  # free but cached: block -> None, least recently freed first
    self._by_hash: dict[int, int] = {}
    self._hash_of: dict[int, int] = {}
    self.hits = 0  # prefix-cache blocks found
    self.allocations = 0  # blocks handed out by allocate, ever

  @property
  def num_free(self) -> int:
    return len(self._never_cached) + len(self._evictable)

  @property
  def num_used(self) -> int:
    return self.num_blocks - self.num_free

  def allocate(self) -> int:
    """A free block held once; a never-cached one first, else the least recently freed cached one."""
    if self._never_cached:
      block = self._never_cached.popleft()
    elif self._evictable:
      block, _ = self._evictable.popitem(last=False)
      del self._by_hash[self._hash_of.pop(block)]
    else:
      raise RuntimeError("no free KV-cache block (the scheduler checks num_free before allocating)")
    self.refs[block] = 1
    self.allocations += 1
    return block

  def hold(self, block: int) -> None:
    if self.refs[block] == 0:
      del self._evictable[block]  # a free block is held again only through the prefix cache
    self.refs[block] += 1

  def release(self, block: int) -> None:
    if self.refs[block] <= 0:
      raise RuntimeError(f"block {block} released more often than held")
    self.refs[block] -= 1
    if self.refs[block] == 0:
      if block in self._hash_of:
        self._evictable[block] = None
      else:
        self._never_cached.append(block)

  def release_all(self, blocks) -> None:
    """Releases a sequence's blocks, last first: a prefix outlives its continuations in the cache."""
    for block in reversed(blocks):
      self.release(block)

  def register(self, block: int, block_hash: int) -> None:
    """Caches a full, computed block under its hash (a block already cached under it wins)."""
    if self.prefix_caching and block_hash not in self._by_hash and block not in self._hash_of:
      self._by_hash[block_hash] = block
      self._hash_of[block] = block_hash

  def match(self, hashes) -> list[int]:
    """Holds and returns the cached blocks of the longest cached prefix of a hash chain."""
    found = []
    if self.prefix_caching:
      for h in hashes:
        block = self._by_hash.get(h)
        if block is None:
          break
        self.hold(block)
        found.append(block)
      self.hits += len(found)
    return found
