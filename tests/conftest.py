"""Tiny random-weight models built from configs (no files, no hub) and shared fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HEADWISE_QUIET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

VOCAB = 96


def tiny_tokenizer(vocab_size: int = VOCAB, bos: bool = True):
    """A word-level tokenizer over tokens t0..tN, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"t{i}" for i in range(vocab_size - len(specials))])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        from tokenizers import processors

        raw.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def _configs():
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                  max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "llama-gqa": ("LlamaForCausalLM", LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)),
        "gemma3-sliding": ("Gemma3ForCausalLM", Gemma3TextConfig(
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], **common)),
        "gpt2": ("GPT2LMHeadModel", GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=1024,
                                               bos_token_id=1, eos_token_id=2)),
        "qwen2": ("Qwen2ForCausalLM", Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)),
        "qwen3": ("Qwen3ForCausalLM", Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common)),
    }


ARCHS = list(_configs())


def tiny_model(arch: str, seed: int = 0):
    import transformers

    cls_name, config = _configs()[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    # Random init gives near-uniform attention; sharper weights make the scores discriminate.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "c_attn")):
                p.mul_(4.0)
    return model


def _vision_configs():
    from transformers import DeiTConfig, Dinov2WithRegistersConfig, ViTConfig

    # 12 x 12 pixels in 3 x 3 patches: a 4 x 4 grid, so offsets and distances vary.
    common = dict(image_size=12, patch_size=3, num_channels=3, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_labels=10)
    return {
        "vit": ("ViTForImageClassification", ViTConfig(intermediate_size=64, **common)),  # CLS + 16 patches
        "deit": ("DeiTForImageClassificationWithTeacher", DeiTConfig(intermediate_size=64, **common)),  # + distillation
        "dinov2-registers": ("Dinov2WithRegistersForImageClassification",
                             Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **common)),  # CLS + 2 reg
    }


VISION_ARCHS = list(_vision_configs())


def tiny_vision_model(arch: str, seed: int = 0):
    """A random-weight image classifier of a tiny geometry (attention sharpened as for the LMs)."""
    import transformers

    cls_name, config = _vision_configs()[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", ".query.", ".key.")):
                p.mul_(4.0)
    return model


@pytest.fixture(params=VISION_ARCHS)
def vision_arch(request):
    return request.param


@pytest.fixture
def tiny_vision(vision_arch):
    import headwise

    return headwise.from_model(tiny_vision_model(vision_arch), name=f"tiny-{vision_arch}")


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def tiny(arch):
    import headwise

    return headwise.from_model(tiny_model(arch), tiny_tokenizer(), name=f"tiny-{arch}")


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama saved as a Hugging Face directory, for tests that go through headwise.load / the CLI.

    (Llama, not Qwen2: AutoTokenizer rebuilds a saved Qwen2 tokenizer its own way.)
    """
    d = tmp_path / "tiny-llama"
    tiny_model("llama-gqa").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """model_dir's directory, saved once per test module (for modules whose tests only read it)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama-gqa").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def word_file(tmp_path):
    """A text file over the tiny tokenizer's words, skewed so that tokens repeat (sinks, copies)."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = [f"t{rng.integers(0, 20) if rng.random() < 0.7 else rng.integers(0, 90)}" for _ in range(3000)]
    path = tmp_path / "words.txt"
    path.write_text(" ".join(words))
    return str(path)


@pytest.fixture(scope="session")
def smollm2():
    import headwise

    return headwise.load("smollm2-135m")
