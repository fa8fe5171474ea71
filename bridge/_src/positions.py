"""The spectral positions: PEFT's ``torch.randperm`` rule, reproduced bit for bit without torch.

PEFT picks the ``n_frequency`` trainable entries of each layer's spectrum as the first ``n`` elements of
``torch.randperm(out * in, generator=torch.Generator().manual_seed(seed))`` and splits each flat index into
``(row, col) = divmod(p, in)``. PEFT never saves these positions, so every compatible implementation has to
regenerate them exactly. Torch's CPU ``randperm`` is a Fisher-Yates shuffle driven by MT19937; this module
replays the same random stream with numpy and computes only the prefix that is needed:

* ``out * in < 214_748_364``: a forward shuffle whose step ``i`` only touches entries ``>= i``, so the first
  ``n`` entries are final after ``n`` draws -- O(n) time and memory, independent of the layer size.
* ``out * in >= 214_748_364`` (torch >= 2.7): an "inside-out" shuffle with 64-bit draws. Every step can write
  into the prefix, so the whole stream is consumed, in chunks, keeping only the prefix in memory.
"""

from __future__ import annotations

import numpy as np

# torch switches algorithm at `n >= 0xFFFFFFFF // 20` (aten/src/ATen/native/cpu/randperm kernels).
INSIDE_OUT_THRESHOLD = 0xFFFFFFFF // 20
_CHUNK = 1 << 20  # draws per chunk of the streamed branch: about 70 MB of numpy temporaries at peak


def _mt19937(seed: int) -> np.random.MT19937:
    """An MT19937 in the state of ``torch.Generator().manual_seed(seed)`` (CPU generator)."""
    # torch takes the seed as uint64 and seeds mt19937 with its low 32 bits through init_genrand, which is
    # exactly numpy's legacy RandomState seeding; pos=624 makes the next draw regenerate the state block.
    key = np.random.RandomState(int(seed) & 0xFFFFFFFF).get_state()[1]
    bit_generator = np.random.MT19937()
    bit_generator.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
    return bit_generator


def randperm_prefix(total: int, count: int, seed: int) -> np.ndarray:
    """The first ``count`` entries of ``torch.randperm(total, generator=Generator().manual_seed(seed))``.

    Example:
        >>> randperm_prefix(10, 4, seed=777).tolist()  # torch.randperm(10, ...)[:4]
        [5, 9, 0, 3]
    """
    total, count, seed = int(total), int(count), int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"randperm_prefix: seed must fit in 64 bits as torch requires, got {seed}")
    if total <= 0:
        raise ValueError(f"randperm_prefix: total must be positive, got {total}")
    if not 0 < count <= total:
        raise ValueError(f"randperm_prefix: count must be in 1..{total}, got {count}")
    bit_generator = _mt19937(seed)
    if total < INSIDE_OUT_THRESHOLD:
        return _forward_shuffle_prefix(bit_generator, total, count)
    return _inside_out_shuffle_prefix(bit_generator, total, count)


def _forward_shuffle_prefix(bit_generator: np.random.MT19937, total: int, count: int) -> np.ndarray:
    # torch: for i in 0..total-2: z = u32 % (total - i); swap(r[i], r[i + z]).  The last step (i = total-1)
    # draws nothing, hence min(count, total - 1) draws.
    steps = min(count, total - 1)
    draws = bit_generator.random_raw(steps).astype(np.uint64)
    offsets = (draws % (total - np.arange(steps, dtype=np.uint64))).tolist()
    if total <= 4 * count:
        # Dense: a plain array swap is cheapest when the prefix is most of the permutation.
        perm = np.arange(total, dtype=np.int64)
        for i, z in enumerate(offsets):
            j = i + z
            perm[i], perm[j] = perm[j], perm[i]
        return perm[:count].copy()
    # Sparse: only displaced entries are stored, so memory stays O(count) for any layer size.
    displaced: dict[int, int] = {}
    prefix = np.empty(count, dtype=np.int64)
    for i, z in enumerate(offsets):
        j = i + z
        value_j = displaced.get(j, j)
        displaced[j] = displaced.get(i, i)
        prefix[i] = value_j
    if steps < count:  # count == total: the final entry never moves after the last step
        prefix[steps] = displaced.get(steps, steps)
    return prefix


def _inside_out_shuffle_prefix(bit_generator: np.random.MT19937, total: int, count: int) -> np.ndarray:
    # torch: for i in 0..total-1: z = u64 % (i + 1); r[i] = r[z]; r[z] = i, with u64 = (hi << 32) | lo.
    # For j < count the final r[j] is the last i >= count that drew z == j (i only grows), or, if none did,
    # its value after the first `count` steps, which run exactly.
    prefix = np.empty(count, dtype=np.int64)
    head = bit_generator.random_raw(2 * count).astype(np.uint64)
    head = (head[0::2] << np.uint64(32)) | head[1::2]
    for i, draw in enumerate(head.tolist()):
        z = draw % (i + 1)
        prefix[i] = prefix[z]
        prefix[z] = i
    start = count
    while start < total:
        stop = min(start + _CHUNK, total)
        raw = bit_generator.random_raw(2 * (stop - start)).astype(np.uint64)
        draws = (raw[0::2] << np.uint64(32)) | raw[1::2]
        steps = np.arange(start, stop, dtype=np.uint64)
        z = draws % (steps + np.uint64(1))
        hits = z < np.uint64(count)
        if hits.any():
            # Later steps carry larger i, so the maximum is the last write.
            np.maximum.at(prefix, z[hits].astype(np.int64), steps[hits].astype(np.int64))
        start = stop
    return prefix


def spectral_indices(out_features: int, in_features: int, n_frequency: int, seed: int) -> np.ndarray:
    """PEFT's spectral positions of one layer: int64 array of shape ``(2, n_frequency)``, rows then columns.

    ``(out_features, in_features)`` is the torch ``nn.Linear`` weight layout; for a Flax ``Dense`` kernel
    ``(in, out)`` use the same call and swap the two rows of the result. Equal to PEFT's
    ``layer.indices[adapter_name]`` for every shape and seed.

    Example:
        >>> spectral_indices(4, 3, n_frequency=2, seed=777).tolist()
        [[3, 2], [2, 1]]
    """
    out_features, in_features, n_frequency = int(out_features), int(in_features), int(n_frequency)
    if out_features <= 0 or in_features <= 0:
        raise ValueError(f"spectral_indices: layer shape must be positive, got ({out_features}, {in_features})")
    if not 0 < n_frequency <= out_features * in_features:
        raise ValueError(
            f"spectral_indices: n_frequency must be in 1..{out_features * in_features} (out*in) for a "
            f"{out_features}x{in_features} layer, got {n_frequency}"
        )
    flat = randperm_prefix(out_features * in_features, n_frequency, seed)
    return np.stack([flat // in_features, flat % in_features]).astype(np.int64)
