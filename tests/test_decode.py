"""The one greedy loop: its stop rule, and its hooks agree with each other."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import headwise
from headwise.decode import greedy, stop_ids
from headwise.errors import HeadwiseError
from headwise.geometry import Geometry
from headwise.instrument import Observer
from tests.conftest import tiny_model, tiny_tokenizer

PIECES = {0: "", 1: "<s>", 2: "</s>", 3: "\n", 4: "Hello", 5: " world", 6: ".\n", 7: " again", 8: "<end>"}


class ScriptedTokenizer:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=False):
        return "".join(PIECES[i] for i in ids if not (skip_special_tokens and i in (1, 2, 8)))


class ScriptedModel(torch.nn.Module):
    """Emits `script[row][step]` as its argmax at decoding step `step` (0: the prompt's call)."""

    def __init__(self, script, eos=None):
        super().__init__()
        self.script = script
        self.generation_config = SimpleNamespace(eos_token_id=eos)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=True, past_key_values=None, logits_to_keep=None):
        self.step = 0 if past_key_values is None else self.step + 1  # the prompt is one call here
        logits = torch.zeros(input_ids.shape[0], 1, len(PIECES))
        for row, tokens in enumerate(self.script):
            logits[row, 0, tokens[min(self.step, len(tokens) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values="cache")


def _loaded(script, eos=None):
    g = Geometry(model_type="scripted", n_layers=1, n_heads=1, n_kv_heads=1, head_dim=1, layer_types=("full",),
                 sliding_window=(None,), max_positions=100, vocab_size=len(PIECES))
    model = ScriptedModel(script, eos)
    return SimpleNamespace(model=model, tokenizer=ScriptedTokenizer(), geometry=g, device=torch.device("cpu"))


PROMPT = torch.tensor([[1, 4]])


@pytest.mark.parametrize("script, until, reply", [
    ([4, 5, 6, 7], "line", [4, 5, 6]),  # a newline after text ends a reply, and is kept
    ([3, 4, 5, 6, 7], "line", [3, 4, 5, 6]),  # a newline before any text does not
    ([4, 5, 2, 7], "line", [4, 5]),  # the tokenizer's EOS ends it and is left out
    ([4, 8, 5], "line", [4]),  # so does the model's generation_config EOS
    ([4, 5, 6, 7, 7, 7], "eos", [4, 5, 6, 7, 7]),  # free text: newlines do not stop, the budget does
    ([4, 2, 5, 6, 7, 7], "budget", [4, 2, 5, 6, 7]),  # timing: exactly the budget, EOS included
])
def test_stop_rule(script, until, reply):
    loaded = _loaded([script], eos=[8])
    out = greedy(loaded, PROMPT, 5, until=until)
    assert out.tokens == [reply]
    assert out.texts == [ScriptedTokenizer().decode(reply, skip_special_tokens=True).strip()]


def test_rows_stop_on_their_own():
    loaded = _loaded([[4, 5, 6, 7], [4, 2, 7, 7], [3, 5, 5, 5]])
    assert greedy(loaded, PROMPT.expand(3, -1), 4).tokens == [[4, 5, 6], [4], [3, 5, 5, 5]]


def test_stop_ids_read_both_sources():
    assert stop_ids(ScriptedTokenizer(), _loaded([[4]], eos=[8, 9]).model) == {2, 8, 9}


def test_observed_and_chunked_decoding_give_the_same_tokens():
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="tiny")
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    seen = []

    class Count(Observer):
        def observe(self, chunk):
            seen.append(chunk.layer)

    plain = greedy(lm, ids, 6, until="budget")
    steps = []
    observed = greedy(lm, ids, 6, until="budget", observe=lambda: [Count()],
                      on_step=lambda step, tokens, observers: steps.append(int(tokens[0])))
    chunked = greedy(lm, ids, 6, until="budget", prefill_chunk=7)
    assert plain.tokens == observed.tokens == chunked.tokens and steps == plain.tokens[0]
    assert len(seen) == 6 * lm.geometry.n_layers  # every decode step, the last prompt token's included


def test_bad_requests_are_one_line_errors():
    loaded = _loaded([[4]])
    for kwargs, why in (({"until": "never"}, "unknown stop rule"), ({"prefill_chunk": 0}, "prefill chunk")):
        with pytest.raises(HeadwiseError, match=why):
            greedy(loaded, PROMPT, 3, **kwargs)
    with pytest.raises(HeadwiseError, match="max_new_tokens"):
        greedy(loaded, PROMPT, 0)
    with pytest.raises(HeadwiseError, match="longer than this model allows"):
        greedy(loaded, PROMPT, 99)
