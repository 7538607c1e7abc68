"""The page: hostile text stays text, nothing is fetched from the network, the size stays bounded."""

from __future__ import annotations

import html
import json
import re

import pytest

from headwise.errors import HeadwiseError
from headwise.report import write_report
from headwise.report.html import json_for_script, render_html, report_data
from tests.report.conftest import HOSTILE_CLOSE, HOSTILE_IMG, HOSTILE_SCRIPT, synthetic_atlas


def embedded_json(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="headwise-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_json_for_script_has_no_markup_characters():
    s = json_for_script({"a": HOSTILE_CLOSE + HOSTILE_IMG + "&amp;\u2028"})
    assert not set("<>&") & set(s)
    assert json.loads(s) == {"a": HOSTILE_CLOSE + HOSTILE_IMG + "&amp;\u2028"}


def test_hostile_strings_cannot_break_out(hostile_atlas_dir):
    page = write_report(hostile_atlas_dir).read_text()
    # Exactly our two script elements; no injected element or attribute anywhere in the markup.
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "<img" not in page and "<script>alert" not in page
    head = page.split("<body>")[0]
    assert html.escape(HOSTILE_IMG) in head  # the title shows the model name escaped
    data = embedded_json(page)
    assert data["model"]["spec"] == HOSTILE_IMG
    assert data["samples"]["short"]["tokens"][1] == HOSTILE_SCRIPT
    assert data["samples"]["long"]["needle"] == HOSTILE_SCRIPT
    # The script never builds markup from strings.
    js = page.split("<script>")[1]
    assert "innerHTML" not in js and "outerHTML" not in js and "insertAdjacentHTML" not in js
    assert "document.write" not in js and "eval(" not in js


def test_page_is_self_contained(hostile_atlas_dir):
    page = write_report(hostile_atlas_dir).read_text()
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", page, re.I)
    assert "fetch(" not in page and "XMLHttpRequest" not in page
    # The only absolute URL is the SVG namespace the script needs to create SVG elements.
    assert set(re.findall(r"https?://[^\s\"')]+", page)) == {"http://www.w3.org/2000/svg"}


def test_validation_is_shown_generically(hostile_atlas_dir):
    data = embedded_json(write_report(hostile_atlas_dir).read_text())
    v = data["validation"]
    assert "ablation.loss_increase" in v["matrices"]
    L, H = data["geometry"]["n_layers"], data["geometry"]["n_heads"]
    assert v["matrices"]["ablation.loss_increase"][H + 2] == pytest.approx(0.01 * (H + 2))
    assert v["records"] == [{"path": "notes.heads[0]", "layer": 1, "head": 2,
                             "fields": [["verdict", HOSTILE_SCRIPT]]}]
    assert ["notes.note", HOSTILE_CLOSE] in v["summary"] and ["induction@k2.baseline", "1.5"] in v["summary"]
    assert v["head_lists"] == {"induction@k2.targeted_heads": [[1, 2], [0, 0]]}
    assert v["verdicts"] == [["induction@k2", "FAILS: " + HOSTILE_IMG, False]]
    assert len(v["matrices"]["ablation.loss_increase"]) == L * H


def test_report_for_smollm2_shapes_stays_under_10_mb():
    data, samples = synthetic_atlas()
    page = render_html(data, samples)
    assert len(page.encode()) < 10 * 2**20
    d = embedded_json(page)
    assert len(d["layout"]["x"]) == 30 * 9 and len(d["scores"]) == 14


def test_report_without_samples_still_builds(tmp_path):
    data, _ = synthetic_atlas(L=4, H=4, KV=2)
    d = report_data(data, None)
    assert d["samples"] is None and len(d["layout"]["x"]) == 16
    assert "distance" in d["profiles"]
    assert d["model"]["dtype"] is None  # an atlas from before headwise recorded the dtype
    data["model"]["dtype"] = "bfloat16"
    assert report_data(data, None)["model"]["dtype"] == "bfloat16"


def test_samples_of_another_model_are_refused(hostile_atlas_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(hostile_atlas_dir, other)
    meta = json.loads((other / "attention_samples.json").read_text())
    meta["model"]["weights_sha256"] = "f" * 64
    (other / "attention_samples.json").write_text(json.dumps(meta))
    with pytest.raises(HeadwiseError, match="another model"):
        write_report(other)


def test_missing_atlas_is_a_clear_error(tmp_path):
    with pytest.raises(HeadwiseError, match="no atlas"):
        write_report(tmp_path / "nowhere")


def test_report_for_a_70b_sized_model_stays_under_10_mb():
    from headwise.geometry import Geometry
    from headwise.report.samples import map_side

    side = map_side(Geometry("llama", 80, 64, 8, 128, ("full",) * 80, (None,) * 80, 8192, 1000), 64)
    data, samples = synthetic_atlas(L=80, H=64, KV=8, short_side=side, long_side=side)
    assert len(render_html(data, samples).encode()) < 10 * 2**20


BROKEN_DISTANCE = {  # distance profiles of documents no schema checked: the page and the map skip them
    "bins as strings": lambda p: p.update(bins=[f"{lo}-{hi}" for lo, hi in p["bins"]]),
    "bins of three": lambda p: p.update(bins=[[*b, 0] for b in p["bins"]]),
    "no bins": lambda p: p.pop("bins"),
    "fewer bins than values": lambda p: p.update(bins=p["bins"][:-1]),
    "records only": lambda p: [p.pop("values"), p.pop("bins"), p.update(records=[{"trial": 1}])],
    "ragged values": lambda p: p["values"][0][0].pop(),
    "values not numbers": lambda p: p["values"][1][2].__setitem__(0, "x"),
}


@pytest.mark.parametrize("case", BROKEN_DISTANCE)
def test_a_distance_profile_the_report_cannot_use_is_skipped(case):
    from headwise.report.layout import pattern_map

    data, samples = synthetic_atlas(L=4, H=4, KV=2)
    assert any(f.startswith("distance") for f in pattern_map(data, None)["features"])
    BROKEN_DISTANCE[case](data["profiles"]["distance"])
    assert not any(f.startswith("distance") for f in pattern_map(data, None)["features"])
    d = embedded_json(render_html(data, samples))
    assert "distance" not in d["profiles"] and len(d["layout"]["x"]) == 16
