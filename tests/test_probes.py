"""Probes are deterministic, sized as asked, and refuse text that cannot fill them."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from headwise.errors import HeadwiseError
from headwise.probes import bundled_text_files, load_text, natural_text, repeated_tokens
from tests.conftest import tiny_tokenizer


def test_repeated_probe_is_seeded():
    tok = tiny_tokenizer()
    a = repeated_tokens(tok, 96, block_len=8, n_sequences=3, seed=1).input_ids
    b = repeated_tokens(tok, 96, block_len=8, n_sequences=3, seed=1).input_ids
    c = repeated_tokens(tok, 96, block_len=8, n_sequences=3, seed=2).input_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_block_larger_than_vocabulary_is_refused():
    with pytest.raises(HeadwiseError, match="distinct tokens"):
        repeated_tokens(tiny_tokenizer(), 96, block_len=200)


def test_text_probe_windows(tmp_path):
    tok = tiny_tokenizer(bos=False)
    path = tmp_path / "t.txt"
    path.write_text(" ".join(f"t{i % 50}" for i in range(400)))
    probe = natural_text(tok, context=64, n_sequences=3, seed=0, text=path)
    assert probe.input_ids.shape == (3, 64)
    assert torch.equal(probe.input_ids, natural_text(tok, context=64, n_sequences=3, seed=0, text=path).input_ids)
    with pytest.raises(HeadwiseError, match="only 400 tokens"):
        natural_text(tok, context=1000, text=path)


def test_bad_text_files(tmp_path):
    with pytest.raises(HeadwiseError, match="not found"):
        load_text(tmp_path / "missing.txt")
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"\xff\xfe\xfa" * 10)
    with pytest.raises(HeadwiseError, match="not UTF-8"):
        load_text(bad)


def test_bundled_text_ships_with_the_package():
    files = bundled_text_files()
    assert len(files) >= 3
    total = sum(f.stat().st_size for f in files)
    assert 200_000 < total < 600_000
    assert all("Project Gutenberg" not in t for t in load_text())


def test_jsonl_text_file_gives_one_document_per_line(tmp_path):
    from headwise.errors import HeadwiseError
    from headwise.probes.text import load_text

    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first doc"}\n"second doc"\n\n{"prompt": "Q: a", "target": " b"}\n')
    assert load_text(path) == ["first doc", "second doc", "Q: a b"]
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(HeadwiseError, match="line 2 is not JSON"):
        load_text(path)


@pytest.mark.slow
def test_passkey_is_a_plain_continuation_and_needles_a_chat_turn(smollm2):
    from headwise.probes.needle import build_case, bundled_needles, needle_case, passkey_case

    tok = smollm2.tokenizer
    plain = passkey_case(tok, context=300, depth=0.5, seed=3)
    text = tok.decode(plain.input_ids[0])
    assert plain.length == 300 and "<|im_start|>" not in text and text.endswith("The pass key is")
    start, end = plain.needle_spans[0]
    assert tok.decode(plain.input_ids[0, start:end]).strip().startswith(f"The pass key is {plain.answer}.")
    assert not plain.settings["chat_template"]
    # the reply to score teacher-forced: " " + key; the key's tokens are those after the space
    assert tok.decode(plain.answer_ids) == " " + plain.answer
    assert "".join(tok.decode([plain.answer_ids[i]]) for i in plain.key_tokens) == plain.answer
    chat = passkey_case(tok, context=300, depth=0.5, seed=3, chat=True)
    assert chat.length == 300 and "<|im_start|>assistant" in tok.decode(chat.input_ids[0])
    needle = needle_case(tok, context=300, depth=0.5, needle=0)
    assert "<|im_start|>assistant" in tok.decode(needle.input_ids[0]) and needle.settings["chat_template"]
    assert needle.answer_ids is None and needle.key_tokens is None  # a free-form reply
    with pytest.raises(HeadwiseError, match="chat template"):
        n = bundled_needles()[0]
        build_case(tiny_tokenizer(), [n], [0.5], context=300, question=n.question, chat=True)


def test_needle_by_number_is_a_bundled_needle_or_a_clear_error():
    from headwise.probes.needle import bundled_needles, needle_case

    tok = tiny_tokenizer()
    n = len(bundled_needles())
    case = needle_case(tok, context=200, depth=0.5, needle=n - 1)
    assert case.needles[0] == bundled_needles()[n - 1]
    with pytest.raises(HeadwiseError, match=f"{n} bundled needles"):
        needle_case(tok, context=200, depth=0.5, needle=n)


# ---- images ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    import headwise
    from tests.conftest import tiny_vision_model

    return headwise.from_model(tiny_vision_model("vit"), name="tiny-vit")


def test_digit_probe_is_seeded_labelled_and_held_out_images_are_disjoint(vit):
    from headwise.probes import image_probe

    a = image_probe(vit.processor, vit.geometry, count=8, seed=3)
    b = image_probe(vit.processor, vit.geometry, count=8, seed=3)
    held = image_probe(vit.processor, vit.geometry, count=8, seed=3, offset=8)
    assert torch.equal(a.pixel_values, b.pixel_values) and a.pixel_values.shape == (8, 3, 12, 12)
    assert a.labels is not None and a.labels.shape == (8,) and a.thumbnails.shape == (8, 64, 64, 3)
    assert not set(a.sources) & set(held.sources) and a.length == 17
    assert a.model_inputs(a.pixel_values).keys() == {"pixel_values"}


def test_directory_probe_reads_png_and_jpeg_through_the_processor(vit, tmp_path):
    from PIL import Image

    from headwise.probes import image_probe

    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg", "c.JPEG"):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    p = image_probe(vit.processor, vit.geometry, count=10, images=str(tmp_path))
    assert [Path(s).name for s in p.sources] == ["a.jpg", "b.png", "c.JPEG"] and p.labels is None
    assert p.pixel_values.shape == (3, 3, 12, 12)


def test_bad_image_inputs_are_one_line_errors(vit, tmp_path):
    from headwise.probes import image_probe

    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    for images, message in [(tmp_path, "cannot read image .*broken.png"), (tmp_path / "absent", "no such directory"),
                            (tmp_path / "empty", "holds no .png")]:
        if images.name == "empty":
            images.mkdir()
        with pytest.raises(HeadwiseError, match=message) as e:
            image_probe(vit.processor, vit.geometry, count=4, images=str(images))
        assert "\n" not in str(e.value)
    with pytest.raises(HeadwiseError, match="needs an image model"):
        image_probe(vit.processor, dataclasses.replace(vit.geometry, patch_grid=None), count=4)


def test_sixteen_bit_images_are_scaled_not_clipped(vit, tmp_path):
    from PIL import Image

    from headwise.probes import image_probe

    a = (np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16)  # 0 .. 57,500
    Image.fromarray(a).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    p = image_probe(vit.processor, vit.geometry, count=1, images=str(tmp_path))
    t = p.thumbnails[0]  # PIL's own conversion would clip nearly every pixel to 255
    assert t[0, 0, 0] == 0 and t.max() == round(57_500 / 65_535 * 255) and (t < 128).mean() > 0.4
    with pytest.raises(HeadwiseError, match="is a file, not a directory"):
        image_probe(vit.processor, vit.geometry, count=1, images=str(tmp_path / "deep.png"))
