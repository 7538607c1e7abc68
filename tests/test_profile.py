"""Profiling the real default model: the scores reproduce known findings about LMs."""

import numpy as np
import pytest

from headwise import ProfileSettings, profile
from headwise.profile import summary

SMALL = ProfileSettings(context=640, text_sequences=1, block_len=48, repeated_sequences=4, razor_sequences=2)


@pytest.fixture(scope="module")
def atlas(smollm2):
    return profile(smollm2, settings=SMALL)


@pytest.mark.slow
def test_scores_are_proportions(atlas):
    for name in ("previous_token", "duplicate_token", "induction", "echo", "razor_induction", "sink",
                 "streamable_mass"):
        s = atlas.score(name)
        assert s.shape == (30, 9) and np.isfinite(s).all() and (s >= -1e-6).all() and (s <= 1 + 1e-6).all(), name


@pytest.mark.slow
def test_real_model_findings(atlas):
    # Previous-token heads exist and sit early; induction heads sit after them (Olsson et al.).
    prev = atlas.heads_with_role("previous-token")
    assert prev, "no previous-token head found"
    (ind_layer, _, ind_score), = atlas.top("induction", 1)
    assert ind_score > 0.3 and ind_layer > min(layer for layer, _ in prev)
    # The two induction definitions (TransformerLens on 2 copies, RazorAttention on 4) agree on who.
    a, b = atlas.score("induction").ravel(), atlas.score("razor_induction").ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.8
    # Attention sinks are common in trained LMs (Gu et al.: most heads of most models).
    assert len(atlas.heads_with_role("sink")) > 270 // 4
    # Sink-dominated heads are what a streaming cache serves well.
    sink, stream = atlas.score("sink").ravel(), atlas.score("streamable_mass").ravel()
    assert stream[sink > 0.9].mean() > stream[sink < 0.3].mean()


@pytest.mark.slow
def test_summary_names_top_heads(atlas):
    text = summary(atlas)
    assert "smollm2-135m: 30 layers x 9 heads (3 KV heads)" in text and "roles:" in text
