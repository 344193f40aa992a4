"""The KV cache: any sequence of appends and rollbacks equals recomputing from scratch."""

import pytest
import torch
from conftest import tiny_model
from hypothesis import given
from hypothesis import strategies as st

from specdec import KVCache
from specdec.models.loading import as_native

BATCH, MAX_LEN = 2, 40


@st.composite
def operations(draw):
    """A list of ('append', n_new per row) and ('rollback', keep per row) that keeps lengths in range."""
    lengths, ops = [0] * BATCH, []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()) or max(lengths) == 0:
            n = [draw(st.integers(0, min(5, MAX_LEN - lengths[b]))) for b in range(BATCH)]
            if sum(n) == 0:
                n[0] = 1 if lengths[0] < MAX_LEN else 0
            ops.append(("append", n))
            lengths = [a + b for a, b in zip(lengths, n)]
        else:
            keep = [draw(st.integers(0, lengths[b])) for b in range(BATCH)]
            ops.append(("rollback", keep))
            lengths = keep
    return ops


@given(operations(), st.randoms(use_true_random=False))
def test_appends_and_rollbacks_equal_recompute(ops, rnd):
    native = as_native(tiny_model("llama"))
    cache = native.new_cache(BATCH, MAX_LEN)
    history = [[] for _ in range(BATCH)]  # the tokens each row's cache should hold
    with torch.no_grad():
        for op, values in ops:
            if op == "rollback":
                cache.rollback(torch.tensor(values))
                history = [h[:n] for h, n in zip(history, values)]
                continue
            width = max(values)
            new = [[rnd.randrange(3, 100) for _ in range(n)] for n in values]
            ids = torch.tensor([row + [0] * (width - len(row)) for row in new])
            positions = cache.next_positions(torch.tensor(values), width)
            native(ids, positions, cache)
            history = [h + row for h, row in zip(history, new)]
        assert cache.lengths.tolist() == [len(h) for h in history]
        # the surviving tokens, recomputed from scratch, give the same keys and values ...
        for b, h in enumerate(history):
            if not h:
                continue
            fresh = native.new_cache(1, MAX_LEN)
            native(torch.tensor([h]), torch.arange(len(h))[None], fresh)
            n = len(h)
            assert torch.allclose(cache.keys[:, b, :, :n], fresh.keys[:, 0, :, :n], rtol=0, atol=1e-12)
            assert torch.allclose(cache.values[:, b, :, :n], fresh.values[:, 0, :, :n], rtol=0, atol=1e-12)
        # ... and the next token's logits are the same too
        probe = torch.tensor([[5]] * BATCH)
        got = native(probe, cache.next_positions(torch.ones(BATCH, dtype=torch.long), 1), cache)
        for b, h in enumerate(history):
            fresh = native.new_cache(1, MAX_LEN)
            want = native(torch.tensor([h + [5]]), torch.arange(len(h) + 1)[None], fresh)[:, -1]
            assert torch.allclose(got[b], want[0], rtol=0, atol=1e-10)


def test_rollback_rejects_growth_and_negative():
    cache = KVCache(num_layers=1, batch_size=2, num_kv_heads=1, head_dim=4, max_len=8, dtype=torch.float32)
    cache.lengths = torch.tensor([3, 5])
    with pytest.raises(ValueError, match="rollback lengths"):
        cache.rollback(torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="rollback lengths"):
        cache.rollback(torch.tensor([-1, 2]))
    assert cache.lengths.tolist() == [3, 5]


def test_cache_is_never_reallocated():
    native = as_native(tiny_model("llama"))
    cache = native.new_cache(1, 16)
    pointers = cache.keys.data_ptr(), cache.values.data_ptr()
    with torch.no_grad():
        for t in range(10):
            native(torch.tensor([[7]]), cache.next_positions(torch.ones(1, dtype=torch.long), 1), cache)
            if t % 3 == 2:
                cache.rollback(cache.lengths - 1)
    assert (cache.keys.data_ptr(), cache.values.data_ptr()) == pointers


def test_overflow_is_refused_before_anything_is_written():
    native = as_native(tiny_model("llama"))
    cache = native.new_cache(1, 4)
    before = cache.keys.clone()
    with pytest.raises(ValueError, match="max_len=4"):
        native(torch.tensor([[5] * 5]), torch.arange(5)[None], cache)
    assert torch.equal(cache.keys, before) and cache.lengths.tolist() == [0]
