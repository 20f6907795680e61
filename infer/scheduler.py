"""Continuous batching: which sequences run in the next engine step, and how many tokens each.

Every step has a budget of `max_num_batched_tokens` tokens and at most `max_num_seqs` running
sequences. Running sequences go first, oldest first: one token each when decoding, or the next
chunk of a prompt (chunked prefill) in whatever budget is left; then waiting sequences are
admitted first-come-first-served while budget, sequence slots and free blocks last, each starting
after the longest prefix the prefix cache already holds. When a running sequence needs a block and
none is free, the newest running sequence is preempted: its blocks are freed and it goes back to
the front of the queue, to be recomputed from its tokens (prompt and output so far) when admitted
again. A forked completion (n > 1) waits for its first sibling's prompt, then shares its blocks.
"""

import bisect
import collections
import dataclasses

from infer.blocks import BlockManager, block_hashes


@dataclasses.dataclass(eq=False)
class Sequence:
  """One completion being generated: its tokens, its blocks and how far its cache is computed."""

  request: object  # the engine's request record
  index: int  # which of the request's n completions
  tokens: list[int]  # prompt, then output
  prompt_len: int
  arrival: int  # admission order: smaller is older
  fork_of: "Sequence | None" = None  # a sibling whose prompt blocks this one shares
  cache_key: object = None  # what else the keys and values depend on (the adapter): part of every block hash
  num_computed: int = 0  # tokens whose keys and values are in the cache
  blocks: list[int] = dataclasses.field(default_factory=list)
  hashes: list[int] = dataclasses.field(default_factory=list)  # hash chain of its full computed blocks
  finished: bool = False

  @property
  def num_output(self) -> int:
    return len(self.tokens) - self.prompt_len


@dataclasses.dataclass(frozen=True)
class Scheduled:
  sequence: Sequence
  start: int  # first position computed this step
  count: int  # tokens computed this step

  @property
  def samples(self) -> bool:  # the step reaches the end of its tokens: its last logits pick the next
    return self.start + self.count == len(self.sequence.tokens)


@dataclasses.dataclass
class Schedule:
  scheduled: list[Scheduled]
  copies: list[tuple[int, int]]  # (source, destination) blocks to copy before the step (copy-on-write)
  preempted: list[Sequence]


class Scheduler:
  def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
    self.blocks = blocks
    self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.running: list[Sequence] = []
    self.num_preemptions = 0

  def add(self, sequence: Sequence) -> None:
    self.waiting.append(sequence)

  def remove(self, sequence: Sequence) -> None:
    """Takes a finished or aborted sequence out and frees its blocks."""
    if sequence in self.running:
      self.running.remove(sequence)
    elif sequence in self.waiting:
      self.waiting.remove(sequence)
    self._free(sequence)

  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  def schedule(self) -> Schedule:
    budget = self.max_num_batched_tokens
    out = Schedule([], [], [])
    i = 0
    while i < len(self.running) and budget > 0:
      seq = self.running[i]
      count = min(len(seq.tokens) - seq.num_computed, budget)
      while not self._reserve(seq, count, out.copies):
        victim = self.running[-1]
        self._preempt(victim)
        out.preempted.append(victim)
        if victim is seq:
          break
      if seq in self.running:
        out.scheduled.append(Scheduled(seq, seq.num_computed, count))
        budget -= count
        i += 1
    while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
      seq = self.waiting[0]
      if seq.fork_of is not None and not self._share_fork(seq):
        break  # its sibling's prompt is not computed yet: wait (first come, first served)
      if not seq.blocks:
        self._match_prefix(seq)
      count = min(len(seq.tokens) - seq.num_computed, budget)
      if not self._reserve(seq, count, out.copies):
        self._free(seq)
        break
      self.waiting.popleft()
      bisect.insort(self.running, seq, key=lambda s: s.arrival)  # oldest first, re-admitted ones too
      out.scheduled.append(Scheduled(seq, seq.num_computed, count))
      budget -= count
    return out

  def computed(self, scheduled: Scheduled) -> None:
    """After a step: the chunk's keys and values are in the cache; full blocks join the prefix cache."""
    seq = scheduled.sequence
    seq.num_computed = scheduled.start + scheduled.count
    full = seq.num_computed // self.blocks.block_size
    known = len(seq.hashes)
    if full > known:
      seq.hashes = block_hashes(seq.tokens, self.blocks.block_size, full, seq.cache_key, seq.hashes)
      for i in range(known, full):
        self.blocks.register(seq.blocks[i], seq.hashes[i])

  def _reserve(self, seq: Sequence, count: int, copies: list) -> bool:
    """Blocks for positions up to num_computed + count - 1, copying a shared block it writes to."""
    size = self.blocks.block_size
    first = seq.num_computed // size  # the first block this step writes
    shared = first < len(seq.blocks) and self.blocks.refs[seq.blocks[first]] > 1
    needed = -(-(seq.num_computed + count) // size) - len(seq.blocks) + shared
    if needed > self.blocks.num_free:
      return False
    if shared:
      copy = self.blocks.allocate()
      copies.append((seq.blocks[first], copy))
      self.blocks.release(seq.blocks[first])
      seq.blocks[first] = copy
    seq.blocks.extend(self.blocks.allocate() for _ in range(needed - shared))
    return True

  def _match_prefix(self, seq: Sequence) -> None:
    """Starts a sequence after the cached blocks of its tokens; at least its last token is computed
    (its logits pick the next token)."""
    full = (len(seq.tokens) - 1) // self.blocks.block_size
    seq.hashes = block_hashes(seq.tokens, self.blocks.block_size, full, seq.cache_key)
    seq.blocks = self.blocks.match(seq.hashes)
    seq.hashes = seq.hashes[: len(seq.blocks)]
    seq.num_computed = len(seq.blocks) * self.blocks.block_size

  def _share_fork(self, seq: Sequence) -> bool:
    """A forked completion shares its sibling's prompt blocks once they are computed (recomputing
    only the last prompt token, whose logits it samples from with its own seed); if the sibling
    is gone or was preempted, it starts on its own."""
    sibling = seq.fork_of
    if sibling.finished:
      seq.fork_of = None
      return True
    if sibling not in self.running or sibling.num_computed < seq.prompt_len:
      return False
    size = self.blocks.block_size
    seq.blocks = sibling.blocks[: -(-seq.prompt_len // size)]
    for block in seq.blocks:
      self.blocks.hold(block)
    seq.hashes = sibling.hashes[: (seq.prompt_len - 1) // size]
    seq.num_computed = seq.prompt_len - 1
    seq.fork_of = None
    return True

  def _preempt(self, seq: Sequence) -> None:
    self.running.remove(seq)
    self._free(seq)
    self.waiting.appendleft(seq)
    self.num_preemptions += 1

  def _free(self, seq: Sequence) -> None:
    self.blocks.release_all(seq.blocks)
    seq.blocks, seq.hashes, seq.num_computed = [], [], 0
