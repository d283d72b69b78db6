"""Attention maps out of a run: the matrices, the PNGs (labels readable for byte-level pieces and
CJK), the self-contained HTML page in a real headless Chromium, and `gpt-keras attention`."""

import os
import shutil

import numpy as np
import pytest

from gpt_keras import GPT, attention
from gpt_keras.cli import main
from gpt_keras.tokenizers import CharTokenizer, GPT2Tokenizer
from gpt_keras.training import create_run
from tests import browser
from tests import numpy_reference as ref
from tests.conftest import GPT2_VOCAB

TEXT = "To be,\nor not 中"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tokenizer = CharTokenizer.train("To be, or not to be: that is the question.\n中文")
    model = GPT.from_preset("tiny", vocab_size=tokenizer.vocab_size, num_layers=2, num_heads=2)
    model.build()
    ref.randomize_weights(model, seed=3)
    directory = str(tmp_path_factory.mktemp("attention") / "run")
    create_run(directory, model, tokenizer, {"test": "random weights"})
    return directory, model, tokenizer


def test_maps_are_the_models_attention_probabilities(run_dir):
    _, model, tokenizer = run_dir
    maps = attention.attention_maps(model, tokenizer, TEXT)
    expected = []
    ref.gpt_logits(model, np.array([maps.token_ids]), scores_out=expected)
    np.testing.assert_allclose(maps.scores, np.stack(expected, axis=1)[0], atol=1e-5)
    assert maps.labels == ["T", "o", "␣", "b", "e", ",", "↵", "o", "r", "␣", "n", "o", "t", "␣",
                           "中"]
    with pytest.warns(UserWarning, match="showing its last 16"):
        assert len(attention.attention_maps(model, tokenizer, "to be " * 5).token_ids) == 16
    with pytest.raises(ValueError, match="no tokens"):
        attention.attention_maps(model, tokenizer, "")


def test_byte_level_pieces_and_missing_glyphs_are_readable(monkeypatch):
    tokenizer = GPT2Tokenizer.from_directory(GPT2_VOCAB)
    ids = tokenizer.tokenize(" the 中 😀").numpy().tolist()
    labels = attention.token_labels(tokenizer, ids)
    assert labels == ["␣the", "␣", "中", "␣<f0 9f 98>", "<80>"]  # 😀 is split across two
    monkeypatch.setattr(attention, "_installed_fonts", lambda: ["DejaVu Sans"])
    assert attention._drawable(["中x", "é"]) == ["U+4E2Dx", "é"]


def test_png_grid_has_every_layer_and_head_with_labels(run_dir, tmp_path):
    _, model, tokenizer = run_dir
    maps = attention.attention_maps(model, tokenizer, "To be")
    figure = attention.plot_attention(maps)
    heat_maps = [axis for axis in figure.axes if axis.get_title()]
    assert [axis.get_title() for axis in heat_maps] == [
        f"layer {l}, head {h}" for l in range(2) for h in range(2)]
    bottom_left = heat_maps[2]
    assert [t.get_text() for t in bottom_left.get_xticklabels()] == ["T", "o", "␣", "b", "e"]
    assert [t.get_text() for t in bottom_left.get_yticklabels()] == ["T", "o", "␣", "b", "e"]
    assert len(figure.axes) == 5  # and the colour bar
    np.testing.assert_array_equal(heat_maps[3].images[0].get_array(), maps.scores[1, 1])
    with pytest.raises(ValueError, match=r"`layer` must be an int in \[0, 2\)"):
        attention.plot_attention(maps, layer=2, head=0)


@pytest.mark.skipif(browser.CHROMIUM is None,
                    reason="Chromium is not installed (`apt-get install chromium`; .ci/run does)")
def test_html_page_in_headless_chromium(run_dir, tmp_path):
    """Loads with no console error and no network; clicking a token highlights what it attends
    to (mean of the heads of layer 0, then one chosen head)."""
    _, model, tokenizer = run_dir
    maps = attention.attention_maps(model, tokenizer, TEXT)
    path = attention.write_attention_page(maps, str(tmp_path / "attention.html"))
    with open(path, encoding="utf-8") as f:
        page_text = f.read()
    assert "http://" not in page_text and "https://" not in page_text and " src=" not in page_text
    with browser.Browser() as chromium:
        page = chromium.open("file://" + path)
        weights = 'Array.from(document.querySelectorAll(".token"), e => Number(e.dataset.weight))'
        last = len(maps.labels) - 1
        np.testing.assert_allclose(page.evaluate(weights), maps.scores[0, :, last].mean(0),
                                   atol=1e-4)  # the last token is selected at first
        page.click('.token[data-index="6"]')
        np.testing.assert_allclose(page.evaluate(weights), maps.scores[0, :, 6].mean(0),
                                   atol=1e-4)
        assert page.evaluate('document.querySelector(".token.selected").dataset.index') == "6"
        page.click('.head[title="layer 1, head 0"]')
        np.testing.assert_allclose(page.evaluate(weights), maps.scores[1, 0, 6], atol=1e-4)
        assert page.errors() == []
        page.screenshot(str(tmp_path / "attention.png"))  # kept out of the repository
        assert os.path.getsize(tmp_path / "attention.png") > 1000


def test_cli_writes_the_pngs_and_the_page(run_dir, tmp_path, capsys):
    directory, _, _ = run_dir
    out = tmp_path / "maps"
    main(["attention", directory, "--prompt", "To be", "--out", str(out), "--layer", "1",
          "--head", "1"])
    printed = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in printed] == [
        "attention-grid.png", "attention-L1-H1.png", "attention.html"]
    for name in ("attention-grid.png", "attention-L1-H1.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["attention", directory, "--prompt", "x", "--out", str(out), "--head", "2"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and "--head must be below 2" in error
    shutil.rmtree(out)
