"""A prefix KV cache for the `hf` engine: each shared token-id prefix is read once.

Token sequences are cut into blocks of `BLOCK_TOKENS` ids, as vLLM's automatic prefix caching cuts
them. The keys and values of a block are kept under the token ids from the sequence's start to the
block's end, so two sequences share exactly the blocks of their longest common block-aligned prefix:
the rubric that opens every judge prompt, one conversation's n samples, the prompt a forced verdict
continues after `generate` read it. Blocks stay across calls of one engine, are evicted least
recently used first once they hold more than `max_bytes`, and go with the engine.

Which blocks a sequence reads from the cache depends on its content only (its whole blocks, within
a limit the caller sets), never on what the cache holds; a missing block is computed over its own
cached prefix, together with the other blocks of the call missing at the same depth (each once). So
a shard run again in a fresh process (a cold cache) reads the same numbers as the uninterrupted run
(a warm one), and eviction never changes a result: the tests check it bit for bit.

The rows of the last `generate` call are kept too (`remember`): each row's prompt, the tokens it
generated, and the keys and values after its prompt's blocks (the prompt's tail from the batch's
prefill, then the generated tokens from decoding). `choose` reads a context that continues a row's
whole prompt from that row as far as their token ids agree, so a forced verdict after `generate`
reads neither the prompt nor the rationale again. Which rows are kept depends only on that last call
(never on the memory bound), and the stages call `choose` on a shard's judgments right after
`generate` wrote them, in the same process: a shard run again computes the same rows the same way.

`prefill` runs the part of each sequence after its cached blocks (at least its last token) for a
batch: the cached blocks are left-padded to the batch's longest, the uncached tails left-padded
after them, so the padding sits between each row's cached prefix and its tail (attention mask 0
there) and positions count real tokens only.

Only models whose cache layers are all full attention can share blocks this way (`supports`);
sliding-window and other cache types keep the engine's plain path.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from typing import Any, Sequence

import torch

# The block size: vLLM's default is 16; 32 halves the single-block forward passes on a CPU while
# still sharing all but the last few tokens of a prefix. Changing it changes the sums a KV comes
# from, so it is a code constant (with the pipeline version), not a setting.
BLOCK_TOKENS = 32


def supports(model: Any) -> tuple[bool, str]:
    """Whether `model`'s cache layers are all full attention (the blocks of one sequence can then
    be computed apart and put back together), and what its cache layers are when not."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception as error:  # a cache the generic DynamicCache cannot describe
        return False, f"its cache cannot be built generically ({type(error).__name__}: {error})"
    kinds = sorted({type(layer).__name__ for layer in layers})
    if layers and all(type(layer) is DynamicLayer for layer in layers):
        return True, "full attention"
    return False, f"its cache layers are {', '.join(kinds) or 'none'}, not all full attention"


def _size(block: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(keys.numel() * keys.element_size() + values.numel() * values.element_size() for keys, values in block)


@cache  # one class: transformers is imported when a model is
def _roomy_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A full-attention cache layer with room set aside for the tokens decoding adds: each step
        writes its keys and values into that room, where `DynamicLayer` concatenates (a copy of the
        whole cache per step: about half of a CPU decode step at the demo's sizes). Attention reads
        the same values in the same order, so the numbers do not change (the tests check it)."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
            super().__init__()
            self.lazy_initialization(keys, values)
            self._reserve(keys, values, room)

        def _reserve(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
            rows, heads, length, width = keys.shape
            self._keys = keys.new_empty((rows, heads, length + room, width))
            self._values = values.new_empty((rows, heads, length + room, width))
            self._keys[:, :, :length], self._values[:, :, :length] = keys, values
            self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
            length, new = self.keys.shape[-2], key_states.shape[-2]
            if length + new > self._keys.shape[-2]:  # out of room: move to a larger buffer
                self._reserve(self.keys, self.values, max(new, length))
            self._keys[:, :, length : length + new], self._values[:, :, length : length + new] = key_states, value_states
            self.keys, self.values = self._keys[:, :, : length + new], self._values[:, :, : length + new]
            return self.keys, self.values

    return RoomyLayer


@dataclass
class Prefill:
    """A batch after its prefill: the next-token logits of each row's last token, and the state
    decoding goes on from (the model's cache, the attention mask over it, each row's next position)."""

    logits: torch.Tensor  # [rows, vocab], float32
    cache: Any  # a transformers DynamicCache
    attention_mask: torch.Tensor  # [rows, cached + tail width]
    next_positions: torch.Tensor  # [rows]
    cached: list[int]  # each row's tokens from blocks

    def for_decoding(self, rows: torch.Tensor, room: int) -> Any:
        """The cache with one row per entry of `rows` (a row of this batch each: the n samples of a
        prompt share its one prefill) and room for `room` more tokens per row, written in place."""
        layer_class = _roomy_layer_class()
        self.cache.layers = [layer_class(layer.keys[rows], layer.values[rows], room) for layer in self.cache.layers]
        return self.cache


@dataclass
class Written:
    """One row of the last `generate` call, kept for the `choose` that follows it: its token ids
    (its prompt, then the tokens it generated and read back, up to its end) and the keys and values
    of those after its prompt's cached blocks, per layer [heads, tokens, head dim]."""

    ids: tuple[int, ...]
    prompt_length: int
    start: int  # tokens from blocks: the keys and values here are of ids[start:]
    layers: list[tuple[torch.Tensor, torch.Tensor]]


class PrefixCache:
    """Blocks of keys and values by token-id prefix, for one model (see the module docstring)."""

    def __init__(self, model: Any, max_bytes: int, block_tokens: int = BLOCK_TOKENS):
        self.model = model
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0  # blocks found / computed
        self.tail_tokens = 0  # tokens read by `prefill` after the cached blocks
        self.written: list[Written] = []  # the rows of the last `generate` call
        self.written_tokens = 0  # tokens `prefill` took from those rows

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
        self.forget_written()

    def forget_written(self) -> None:
        self.written = []

    def remember(self, prompts: list[list[int]], generated: list[list[int]], cache: Any, attention_mask: torch.Tensor, cached: list[int]) -> None:
        """Keep each decoded row for `choose`: its prompt, the `generated` tokens whose keys and
        values `cache` holds (those read back, up to the row's end), and those keys and values after
        its `cached` block tokens, taken from the positions `attention_mask` marks as real."""
        for row, (prompt, tokens, start) in enumerate(zip(prompts, generated, cached)):
            real = torch.nonzero(attention_mask[row]).flatten()[start : len(prompt) + len(tokens)]
            layers = [(layer.keys[row][:, real], layer.values[row][:, real]) for layer in cache.layers]  # copies
            self.written.append(Written((*prompt, *tokens), len(prompt), start, layers))

    def _written_match(self, ids: list[int]) -> tuple[Written, int] | None:
        """The row of the last `generate` call whose whole prompt `ids` continues, sharing the most
        tokens with it, and how many (never `ids`' last token)."""
        best = None
        for written in self.written:
            if len(ids) - 1 > written.prompt_length and tuple(ids[: written.prompt_length]) == written.ids[: written.prompt_length]:
                common = next((at for at, (a, b) in enumerate(zip(ids[: len(ids) - 1], written.ids)) if a != b), min(len(ids) - 1, len(written.ids)))
                if best is None or common > best[1]:
                    best = (written, common)
        return best

    def cached_length(self, length: int, limit: int | None = None) -> int:
        """How many leading tokens of a `length`-token sequence come from blocks: whole blocks
        within its first `limit` tokens (all by default), never its last token (its logits are
        what a caller reads)."""
        usable = max(length - 1, 0) if limit is None else min(max(length - 1, 0), limit)
        return (usable // self.block_tokens) * self.block_tokens

    def _cache_from(self, layers: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Any:
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=layers, config=self.model.config) if layers else DynamicCache(config=self.model.config)

    def _joined(self, prefix: Sequence[int], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values per layer, [heads, length, head dim], of the first `length` tokens of a
        prefix whose blocks are all cached."""
        blocks = [self._blocks[tuple(prefix[:end])] for end in range(self.block_tokens, length + 1, self.block_tokens)]
        return [
            (torch.cat([block[layer][0][0] for block in blocks], dim=-2), torch.cat([block[layer][1][0] for block in blocks], dim=-2))
            for layer in range(len(blocks[0]))
        ]

    def _stacked(self, prefixes: list[tuple[int, ...]], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`_joined` of several prefixes of one length, stacked: [rows, heads, length, head dim]."""
        rows = [self._joined(prefix, length) for prefix in prefixes]
        return [(torch.stack([row[layer][0] for row in rows]), torch.stack([row[layer][1] for row in rows])) for layer in range(len(rows[0]))]

    def _compute_missing(self, sequences: list[list[int]], lengths: list[int]) -> None:
        """Compute every missing block of the sequences' cached parts, depth by depth: the blocks
        missing at one depth (each once, in the order of their ids) in one forward pass over their
        own cached prefixes. They are the call's own new blocks, so a shard run again (warm or cold
        cache, evicted or not) computes them in the same company: CPU matmuls give each row the
        same numbers whatever the batch beside it (checked by the tests), hence the same keys."""
        device = self.model.device
        for end in range(self.block_tokens, max(lengths, default=0) + 1, self.block_tokens):
            wanted = {tuple(ids[:end]) for ids, length in zip(sequences, lengths) if end <= length}
            missing = sorted(key for key in wanted if key not in self._blocks)
            self.hits += len(wanted) - len(missing)
            if not missing:
                continue
            start = end - self.block_tokens
            cache = self._cache_from(self._stacked(missing, start) if start else None)
            self.model(
                input_ids=torch.tensor([key[start:] for key in missing], device=device),
                position_ids=torch.arange(start, end, device=device)[None].expand(len(missing), -1),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            for row, key in enumerate(missing):
                block = [(layer.keys[row : row + 1, :, start:end].clone(), layer.values[row : row + 1, :, start:end].clone()) for layer in cache.layers]
                self._blocks[key] = block
                self.bytes += _size(block)
            self.misses += len(missing)
        for ids, length in zip(sequences, lengths):  # recently used: evicted last
            for end in range(self.block_tokens, length + 1, self.block_tokens):
                self._blocks.move_to_end(tuple(ids[:end]))

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.bytes -= _size(block)

    def prefill(self, sequences: list[list[int]], pad_token_id: int, limits: list[int] | None = None, reuse_written: bool = False) -> Prefill:
        """Read a batch of token sequences: their cached blocks (within `limits[row]` tokens, all
        whole blocks by default; computed where missing), then the tails in one batched forward pass.
        With `reuse_written`, a sequence that continues the prompt of a row of the last `generate`
        call takes that row's blocks and its keys and values as far as the two agree (`choose` after
        `generate` reads neither the prompt nor the rationale again). Returns the last token's logits
        and the decoding state."""
        device = self.model.device
        matches = [self._written_match(ids) if reuse_written else None for ids in sequences]
        blocks = [
            match[0].start if match else self.cached_length(len(ids), None if limits is None else limits[row])
            for row, (ids, match) in enumerate(zip(sequences, matches))
        ]
        self._compute_missing(sequences, blocks)
        cached = [match[1] if match else length for match, length in zip(matches, blocks)]
        self.written_tokens += sum(match[1] - match[0].start for match in matches if match)
        tails = [ids[length:] for ids, length in zip(sequences, cached)]
        width_cached, width_tail = max(cached), max(len(tail) for tail in tails)
        rows = len(sequences)
        past = None
        if width_cached:
            # Each row's blocks (then its part of a written row) left-padded to the longest cached
            # part (zeros under attention mask 0).
            joined = [self._joined(ids, length) if length else None for ids, length in zip(sequences, blocks)]
            for row, match in enumerate(matches):
                if match:
                    written, length = match
                    extension = [(keys[:, : length - written.start], values[:, : length - written.start]) for keys, values in written.layers]
                    joined[row] = [
                        (torch.cat([keys, more_keys], dim=-2), torch.cat([values, more_values], dim=-2))
                        for (keys, values), (more_keys, more_values) in zip(joined[row], extension)
                    ] if joined[row] else extension
            reference = next(layers for layers in joined if layers)
            past = []
            for layer, (key, value) in enumerate(reference):
                shape = (rows, key.shape[0], width_cached, key.shape[2])
                keys, values = key.new_zeros(shape), value.new_zeros(shape)
                for row, (layers, length) in enumerate(zip(joined, cached)):
                    if layers:
                        keys[row, :, width_cached - length :], values[row, :, width_cached - length :] = layers[layer]
                past.append((keys, values))
        self._evict()
        input_ids = torch.full((rows, width_tail), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, width_cached + width_tail), dtype=torch.long)
        position_ids = torch.zeros((rows, width_tail), dtype=torch.long)
        for row, (length, tail) in enumerate(zip(cached, tails)):
            input_ids[row, width_tail - len(tail) :] = torch.tensor(tail, dtype=torch.long)
            attention_mask[row, width_cached - length : width_cached] = 1
            attention_mask[row, width_cached + width_tail - len(tail) :] = 1
            position_ids[row, width_tail - len(tail) :] = torch.arange(length, length + len(tail))
        self.tail_tokens += sum(len(tail) for tail in tails)
        cache = self._cache_from(past)
        attention_mask = attention_mask.to(device)
        output = self.model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask,
            position_ids=position_ids.to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_positions = torch.tensor([len(ids) for ids in sequences], device=device)
        return Prefill(output.logits[:, -1, :].float(), output.past_key_values, attention_mask, next_positions, cached)
