"""How a distribution is formed from logits: the vocabulary padding rows never receive probability."""

import jax
import jax.numpy as jnp
import numpy as np

from distillspec_jax import sampling


def test_mask_padding_vocab_removes_padding_rows():
    logits = jnp.arange(12, dtype=jnp.float32).reshape(2, 6)
    masked = sampling.mask_padding_vocab(logits, real_vocab_size=4)
    probs = jax.nn.softmax(masked, axis=-1)
    assert np.all(np.asarray(probs)[:, 4:] == 0.0)
    assert np.allclose(np.asarray(probs).sum(-1), 1.0)
    assert np.array_equal(np.asarray(masked)[:, :4], np.asarray(logits)[:, :4])
