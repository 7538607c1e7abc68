"""sink, streamable_mass and the distance profile equal naive loops over eager weights."""

import numpy as np
import pytest

from headwise.errors import HeadwiseError
from headwise.probes import natural_text
from headwise.profile import ProfileSettings, profile
from headwise.scores.distance import distance_bins
from tests import reference as ref


def test_text_scores_match_reference(tiny, word_file):
    settings = ProfileSettings(context=40, text=word_file, text_sequences=2, sink_tokens=3, window=8, seed=1,
                               chunk_bytes=4 * 4 * 40 * 4 * 6)
    atlas = profile(tiny, ["sink", "streamable_mass", "mean_distance", "entropy"], settings)
    probe = natural_text(tiny.tokenizer, context=40, n_sequences=2, seed=1, text=word_file)
    atts = ref.eager_attentions(tiny.model, probe.input_ids)
    np.testing.assert_allclose(atlas.score("sink"), ref.per_head(atts, ref.sink), atol=2e-5)
    np.testing.assert_allclose(atlas.score("streamable_mass"), ref.per_head(atts, lambda a: ref.streamable(a, 3, 8)),
                               atol=2e-5)
    np.testing.assert_allclose(atlas.score("mean_distance"), ref.per_head(atts, ref.mean_distance), rtol=1e-4)
    np.testing.assert_allclose(atlas.score("entropy"), ref.per_head(atts, ref.entropy), rtol=1e-4, atol=1e-5)
    bins = distance_bins(39)
    assert [tuple(b) for b in atlas.profile("distance")["bins"]] == bins
    expected = ref.per_head(atts, lambda a: ref.distance_profile(a, bins))
    np.testing.assert_allclose(np.array(atlas.profile("distance")["values"]), expected, atol=2e-5)
    np.testing.assert_allclose(np.array(atlas.profile("distance")["values"]).sum(-1), 1.0, atol=1e-4)


def test_sliding_layers_see_only_their_window(word_file):
    import headwise
    from tests.conftest import tiny_model, tiny_tokenizer

    m = headwise.from_model(tiny_model("gemma3-sliding"), tiny_tokenizer())
    atlas = profile(m, ["mean_distance"], ProfileSettings(context=40, text=word_file, text_sequences=1))
    window = m.geometry.sliding_window[0]
    assert (atlas.score("mean_distance")[:2] <= window - 1 + 1e-6).all()  # sliding layers: distance < window
    bins = distance_bins(39)
    far = [k for k, (lo, _) in enumerate(bins) if lo >= window]
    assert np.abs(np.array(atlas.profile("distance")["values"])[:2][..., far]).max() < 1e-6


def test_bins_cover_every_distance_once():
    bins = distance_bins(100)
    covered = [d for lo, hi in bins for d in range(lo, hi + 1)]
    assert covered[:101] == list(range(101)) and bins[:4] == [(0, 0), (1, 1), (2, 3), (4, 7)]


def test_streaming_needs_context_beyond_sink_and_window(tiny, word_file):
    with pytest.raises(HeadwiseError, match="longer than sink"):
        profile(tiny, ["streamable_mass"], ProfileSettings(context=40, text=word_file, sink_tokens=30, window=20))
