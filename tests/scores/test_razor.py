"""echo / razor_induction equal a loop-by-loop transcription of RazorAttention's definition."""

import numpy as np

from headwise.probes import repeated_tokens
from headwise.profile import ProfileSettings, profile
from tests.reference import eager_attentions, razor_scores


def test_razor_scores_match_reference(tiny):
    settings = ProfileSettings(block_len=8, razor_sequences=2, seed=5, chunk_bytes=4 * 4 * 33 * 4 * 7)
    atlas = profile(tiny, ["echo", "razor_induction"], settings)
    probe = repeated_tokens(tiny.tokenizer, tiny.geometry.vocab_size, block_len=8, repeats=4, n_sequences=2, seed=5)
    echo, ind = razor_scores(eager_attentions(tiny.model, probe.input_ids), probe.input_ids)
    np.testing.assert_allclose(atlas.score("echo"), echo, atol=2e-5)
    np.testing.assert_allclose(atlas.score("razor_induction"), ind, atol=2e-5)
    # GQA: the KV aggregate is the max / mean over each KV head's query group.
    g = tiny.geometry
    grouped = atlas.score("echo").reshape(g.n_layers, g.n_kv_heads, g.group_size)
    np.testing.assert_allclose(atlas.score("echo", "kv_max"), grouped.max(-1), atol=1e-5)
    np.testing.assert_allclose(atlas.score("echo", "kv_mean"), grouped.mean(-1), atol=1e-5)
