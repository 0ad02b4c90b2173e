"""The Flax Qwen3 computes what transformers' PyTorch Qwen3 computes: one pass, cached decode, ragged batches."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distillspec_jax.models import catalog, convert, qwen3
from tests.tiny import TINY_BASE, TINY_CASES, hf_logits, hf_qwen3

ATOL = 1e-4  # float32 parity bound on logits (issue and design §8)


def _tokens(batch, length, seed=0, vocab=TINY_BASE["vocab_size"]):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length))


@pytest.mark.parametrize("case", sorted(TINY_CASES))
@pytest.mark.parametrize("length", [1, 7, 13])
def test_convert_matches_hf_logits(tiny_checkpoints, case, length):
    tokens = _tokens(3, length, seed=length)
    model = convert.load_hf(tiny_checkpoints[case])
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = hf_logits(tiny_checkpoints[case], tokens)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (3, length, TINY_BASE["vocab_size"])
    err = np.abs(ours - ref).max()
    print(f"parity {case} T={length}: max|dlogit|={err:.2e}")
    assert err <= ATOL


@pytest.mark.parametrize("case", ["tied_gqa", "untied_mha"])
def test_ragged_batch_matches_hf_with_attention_mask(tiny_checkpoints, case):
    """Rows of different lengths, right-padded: valid positions match HF run with an attention mask."""
    lengths = np.array([9, 4, 1, 6])
    tokens = _tokens(4, 9, seed=3)
    valid = np.arange(9)[None, :] < lengths[:, None]
    tokens = np.where(valid, tokens, 0)
    model = convert.load_hf(tiny_checkpoints[case])
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = hf_logits(tiny_checkpoints[case], tokens, attention_mask_bt=valid.astype(np.int64))
    err = np.abs(ours - ref)[valid].max()
    print(f"parity ragged {case}: max|dlogit|={err:.2e}")
    assert err <= ATOL


@pytest.mark.parametrize("case", ["tied_gqa", "untied_mha"])
def test_cached_decode_equals_full_forward(tiny_checkpoints, case):
    """Prefill of a chunk, then token-by-token and multi-token cached steps, equal one full pass (and HF)."""
    tokens = _tokens(2, 15, seed=5)
    model = convert.load_hf(tiny_checkpoints[case])
    full = np.asarray(model(jnp.asarray(tokens)))
    cache = qwen3.KVCache.init(model.cfg, batch=2, max_len=24)
    step = jax.jit(lambda m, t, c: m.step(t, c))
    pieces = []
    for lo, hi in [(0, 6), (6, 7), (7, 8), (8, 11), (11, 12), (12, 15)]:
        logits, cache = step(model, jnp.asarray(tokens[:, lo:hi]), cache)
        pieces.append(np.asarray(logits))
    cached = np.concatenate(pieces, axis=1)
    assert np.asarray(cache.lengths).tolist() == [15, 15]
    err = np.abs(cached - full).max()
    err_hf = np.abs(cached - hf_logits(tiny_checkpoints[case], tokens)).max()
    print(f"cached {case}: vs full {err:.2e}, vs HF {err_hf:.2e}")
    assert err <= ATOL and err_hf <= ATOL


def test_cached_decode_with_per_row_lengths(tiny_checkpoints):
    """Rows at different cache lengths advance together; stale slots beyond a row's length are ignored."""
    path = tiny_checkpoints["untied_gqa"]
    model = convert.load_hf(path)
    prompt_lens = np.array([5, 9, 2])
    seqs = _tokens(3, 16, seed=11)
    padded = np.where(np.arange(9)[None] < prompt_lens[:, None], seqs[:, :9], 7)  # garbage after each prompt
    cache = qwen3.KVCache.init(model.cfg, batch=3, max_len=20)
    logits, cache = model.step(jnp.asarray(padded), cache)
    cache = cache.with_lengths(jnp.asarray(prompt_lens))
    got = {b: [np.asarray(logits[b, prompt_lens[b] - 1])] for b in range(3)}
    for i in range(4):  # each row feeds its own next true token
        nxt = seqs[np.arange(3), prompt_lens + i][:, None]
        logits, cache = model.step(jnp.asarray(nxt), cache)
        for b in range(3):
            got[b].append(np.asarray(logits[b, 0]))
    assert np.asarray(cache.lengths).tolist() == (prompt_lens + 4).tolist()
    for b in range(3):
        want = hf_logits(path, seqs[b : b + 1, : prompt_lens[b] + 4])[0, prompt_lens[b] - 1 :]
        assert np.abs(np.stack(got[b]) - want).max() <= ATOL


def test_rollback_overwrites_stale_entries(tiny_checkpoints):
    """Lowering lengths (rejected drafts) and writing new tokens gives the logits of the new sequence."""
    path = tiny_checkpoints["tied_gqa"]
    model = convert.load_hf(path)
    seq_a, seq_b = _tokens(1, 10, seed=1), _tokens(1, 10, seed=2)
    seq_b[:, :6] = seq_a[:, :6]  # shared prefix of 6, then the sequences diverge
    cache = qwen3.KVCache.init(model.cfg, batch=1, max_len=12)
    _, cache = model.step(jnp.asarray(seq_a), cache)
    cache = cache.with_lengths(jnp.array([6]))  # reject the last 4 tokens of a
    logits, cache = model.step(jnp.asarray(seq_b[:, 6:]), cache)
    want = hf_logits(path, seq_b)[:, 6:]
    assert np.abs(np.asarray(logits) - want).max() <= ATOL


def test_bfloat16_compute_is_close_to_float32(tiny_checkpoints):
    """bfloat16 parameters and compute still give float32 logits close to the float32 model."""
    path = tiny_checkpoints["untied_gqa"]
    tokens = jnp.asarray(_tokens(2, 8))
    ref = np.asarray(convert.load_hf(path)(tokens))
    bf16 = convert.load_hf(path, dtype="bfloat16")
    mixed = convert.load_hf(path, dtype="bfloat16", param_dtype="float32")
    assert bf16.embed[...].dtype == jnp.bfloat16 and mixed.embed[...].dtype == jnp.float32
    for model in (bf16, mixed):
        out = model(tokens)
        assert out.dtype == jnp.float32
        # bfloat16 keeps ~3 significant digits; logits here are O(1).
        assert np.abs(np.asarray(out) - ref).max() < 0.1
        assert np.mean(np.argmax(np.asarray(out), -1) == np.argmax(ref, -1)) > 0.9


def test_presets_match_published_shapes():
    """Parameter counts of the presets agree with the published sizes (non-embedding and total)."""
    published_total = {"Qwen3-0.6B": 0.6e9, "Qwen3-1.7B": 1.7e9, "Qwen3-4B": 4.0e9, "Qwen3-8B": 8.2e9,
                       "Qwen3-14B": 14.8e9, "Qwen3-32B": 32.8e9}
    for name, total in published_total.items():
        cfg = catalog.preset(name)
        assert cfg.real_vocab_size == 151669 and cfg.vocab_size == 151936
        assert abs(cfg.num_params() - total) / total < 0.05, (name, cfg.num_params())
    assert catalog.preset("Qwen/Qwen3-8B").tie_word_embeddings is False
    assert catalog.preset("Qwen3-0.6B").tie_word_embeddings is True
    with pytest.raises(ValueError, match="unknown Qwen3 preset"):
        catalog.preset("Qwen3-7B")


@pytest.mark.slow
def test_real_qwen3_0_6b_shape_matches_hf(tmp_path):
    """One parity run at the exact Qwen3-0.6B shape (random weights, real vocabulary and head layout)."""
    cfg = convert.to_hf_config(catalog.preset("Qwen3-0.6B"))
    fields = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                                  "max_position_embeddings", "rope_theta")}
    hf = hf_qwen3(seed=0, **fields)
    hf.save_pretrained(tmp_path)
    tokens = _tokens(2, 6, vocab=151669)
    ref = hf_logits(hf, tokens)
    del hf
    model = convert.load_hf(tmp_path)
    assert model.cfg == catalog.preset("Qwen3-0.6B")
    err = np.abs(np.asarray(model(jnp.asarray(tokens))) - ref).max()
    print(f"parity Qwen3-0.6B shape: max|dlogit|={err:.2e}")
    assert err <= ATOL


def test_cache_windows_bound_the_slots_a_step_reads():
    """Windows ascend, end at the capacity, and the one `window_index` picks is the smallest that holds the longest
    row after the step, with at most max(block, overhead · window) slots beyond it."""
    for max_len, block in [(4096, 128), (300, 128), (100, 128), (40960, 128), (50, 4)]:
        windows = qwen3.cache_windows(max_len, block)
        assert windows[-1] == max_len and list(windows) == sorted(set(windows))
        for needed in range(1, max_len + 1, max(1, max_len // 97)):
            index = int(qwen3.window_index(windows, jnp.array([needed - 1, 0]), 1))
            window = windows[index]
            assert window >= needed and (index == 0 or windows[index - 1] < needed)
            assert window - needed < max(block, qwen3.WINDOW_OVERHEAD * window)


@pytest.mark.parametrize("tokens_per_step", range(1, 9))  # a decode step (1) and the verify call of every γ <= 7
def test_attention_over_the_live_cache_equals_the_whole_cache(tokens_per_step):
    """A step that reads only the window holding its rows gives the logits of the plain definition that reads
    every slot, for ragged rows and after a rollback that leaves stale entries behind (small blocks, so the rows
    cross several windows)."""
    cfg = qwen3.Qwen3Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model, max_len = qwen3.init_model(cfg, seed=3), 48
    windows = qwen3.cache_windows(max_len, block=4)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=2)
    def step(tokens_bt, cache, windows):
        return nnx.merge(graphdef, state).step(tokens_bt, cache, windows=windows)

    assert len(windows) > 5
    seqs = jnp.asarray(_tokens(3, max_len, seed=tokens_per_step, vocab=61))
    lens = jnp.array([1, 9, 17])  # ragged rows; the prefill writes garbage (the rest of the row) past each length
    cache = qwen3.KVCache.init(cfg, batch=3, max_len=max_len)
    _, cache = step(seqs[:, :24], cache, (max_len,))
    cache = cache.with_lengths(lens)
    for i in range(3):
        new = jax.lax.dynamic_slice_in_dim(seqs, 24 + i * tokens_per_step, tokens_per_step, axis=1)
        live, live_cache = step(new, cache, windows)
        whole, whole_cache = step(new, cache, (max_len,))
        np.testing.assert_allclose(np.asarray(live), np.asarray(whole), atol=1e-6, rtol=0)
        np.testing.assert_allclose(np.asarray(live_cache.k), np.asarray(whole_cache.k), atol=1e-6, rtol=0)
        # roll back all but one of the new tokens (as after rejected drafts), so stale entries lie past each length
        cache = live_cache.with_lengths(cache.lengths + 1)
    # the step read fewer windows than the capacity: the smallest holding the longest row
    assert windows[int(qwen3.window_index(windows, cache.lengths, tokens_per_step))] < max_len


def test_row_by_row_and_scattered_cache_writes_agree(monkeypatch):
    """Both ways `_write_rows` writes (one update per row for small batches, one scatter for large ones) put every
    row's new entries at its own slots and leave the rest alone."""
    cache_lbksh = jnp.asarray(np.random.RandomState(0).randn(2, 5, 3, 16, 4), jnp.float32)
    new_btkh = jnp.asarray(np.random.RandomState(1).randn(5, 3, 3, 4), jnp.float32)
    start_b = jnp.array([0, 7, 13, 2, 9])
    want = np.array(cache_lbksh)
    for b in range(5):
        want[1, b, :, int(start_b[b]):int(start_b[b]) + 3] = np.swapaxes(np.asarray(new_btkh[b]), 0, 1)
    by_row = qwen3._write_rows(cache_lbksh, jnp.int32(1), new_btkh, start_b)
    monkeypatch.setattr(qwen3, "UNROLLED_WRITE_ROWS", 4)
    scattered = qwen3._write_rows(cache_lbksh, jnp.int32(1), new_btkh, start_b)
    np.testing.assert_array_equal(np.asarray(by_row), want)
    np.testing.assert_array_equal(np.asarray(scattered), want)
