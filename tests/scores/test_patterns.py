"""previous_token / duplicate_token / induction equal TransformerLens's detector on eager weights."""

import numpy as np
import pytest

from headwise.probes import repeated_tokens
from headwise.profile import ProfileSettings, profile
from tests.reference import eager_attentions, tl_scores

NAMES = ["previous_token", "duplicate_token", "induction"]


@pytest.mark.parametrize("exclude_bos,exclude_current", [(False, False), (True, True)])
def test_pattern_scores_match_transformerlens_definition(tiny, exclude_bos, exclude_current):
    # A tiny chunk budget forces several query chunks per layer.
    settings = ProfileSettings(block_len=12, repeated_sequences=3, seed=3, exclude_bos=exclude_bos,
                               exclude_current_token=exclude_current, chunk_bytes=4 * 4 * 25 * 4 * 5)
    atlas = profile(tiny, NAMES, settings)
    probe = repeated_tokens(tiny.tokenizer, tiny.geometry.vocab_size, block_len=12, repeats=2, n_sequences=3, seed=3)
    atts = eager_attentions(tiny.model, probe.input_ids)
    for name in NAMES:
        ref = tl_scores(atts, probe.input_ids, name, exclude_bos, exclude_current)
        np.testing.assert_allclose(atlas.score(name), ref, atol=2e-5, err_msg=name)


def test_probe_is_bos_plus_distinct_block_repeated(tiny):
    probe = repeated_tokens(tiny.tokenizer, tiny.geometry.vocab_size, block_len=10, repeats=2, n_sequences=2, seed=0)
    ids = probe.input_ids
    assert ids.shape == (2, 21) and (ids[:, 0] == tiny.tokenizer.bos_token_id).all()
    for row in ids:
        block = row[1:11]
        assert len(set(block.tolist())) == 10
        assert (row[11:] == block).all()
        assert not set(block.tolist()) & set(tiny.tokenizer.all_special_ids)
