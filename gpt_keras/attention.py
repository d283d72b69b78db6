"""Attention maps: what each token of a text attends to, per layer and head.

    maps = attention_maps(model, tokenizer, "To be, or not to be")
    plot_attention(maps)                      # a layers × heads grid of heat maps (a Figure)
    plot_attention(maps, layer=0, head=1)     # one head at full size
    write_attention_page(maps, "attention.html")   # a self-contained, interactive page
    gpt-keras attention RUN --prompt TEXT --out DIR [--layer L] [--head H]

Heat map rows are queries (the attending token), columns keys: row t holds the probabilities with
which token t attends to tokens 0..t (causal: the upper triangle is 0). Token labels show each
token's own text: a leading space as "␣", a newline as "↵", a tab as "→", and bytes that are not
whole UTF-8 characters (byte-level BPE pieces of a multi-byte character) as "<e4 b8>". In the
PNGs, characters that no installed font can draw (CJK text without a CJK font) become "U+4E2D".
"""

import html
import json
import os
import warnings
from typing import NamedTuple

import numpy as np

from gpt_keras.tokenizers import raw_token_bytes

__all__ = ["AttentionMaps", "attention_maps", "plot_attention", "token_labels",
           "write_attention_page", "write_attention_report"]

# Tried in this order for each glyph (matplotlib's font fallback); missing ones are skipped.
_FONTS = ["DejaVu Sans", "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC",
          "WenQuanYi Zen Hei", "Droid Sans Fallback", "Arial Unicode MS"]


class AttentionMaps(NamedTuple):
    """`labels` (one readable string per token), `token_ids` `[T]` and `scores` float32
    `[L, H, T, T]`: layer l, head h, row t = what token t attends to."""

    labels: list
    token_ids: list
    scores: np.ndarray


def attention_maps(model, tokenizer, text):
    """The attention probabilities of `model` over the tokens of `text` (its last
    `context_length` tokens if longer, with a warning). `ValueError` for a text with no token."""
    if not isinstance(text, str):
        raise ValueError(f"`text` must be a `str`. Received: {text!r}")
    ids = [int(i) for i in np.asarray(tokenizer.tokenize(text)).reshape(-1)]
    if not ids:
        raise ValueError("The text has no tokens: pass a non-empty --prompt.")
    context = model.config.context_length
    if len(ids) > context:
        warnings.warn(f"The text has {len(ids)} tokens; showing its last {context} "
                      f"(context_length={context}).", stacklevel=2)
        ids = ids[-context:]
    _, scores = model(np.array([ids], np.int32), return_attention_scores=True)
    return AttentionMaps(token_labels(tokenizer, ids), ids, np.asarray(scores)[0])


def token_labels(tokenizer, ids):
    """One label per token id (see the module docstring), from its raw bytes
    (`tokenizers.raw_token_bytes`)."""
    return [_readable(data) for data in raw_token_bytes(tokenizer, ids)]


def _readable(data):
    """Bytes → text with whitespace made visible and invalid UTF-8 as "<hex bytes>"."""
    def visible(text):
        for character, sign in ((" ", "␣"), ("\n", "↵"), ("\t", "→"), ("\r", "␍")):
            text = text.replace(character, sign)
        return text

    pieces, rest = [], data
    while rest:
        try:
            pieces.append(visible(rest.decode("utf-8")))
            break
        except UnicodeDecodeError as error:
            pieces.append(visible(rest[: error.start].decode("utf-8")))
            pieces.append("<" + " ".join(f"{b:02x}" for b in rest[error.start: error.end]) + ">")
            rest = rest[error.end:]
    return "".join(pieces) or "∅"


def plot_attention(maps, layer=None, head=None, cmap="viridis"):
    """A matplotlib `Figure`: every layer × head (default), or one `layer`/`head` at full size,
    token labels on both axes and a colour bar of the probability."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    num_layers, num_heads, length, _ = maps.scores.shape
    for name, value, limit in (("layer", layer, num_layers), ("head", head, num_heads)):
        if value is not None and not (isinstance(value, int) and 0 <= value < limit):
            raise ValueError(f"`{name}` must be an int in [0, {limit}). Received: {name}={value!r}")
    if (layer is None) != (head is None):
        raise ValueError("Pass both `layer` and `head` (one head at full size) or neither (all).")
    cells = [(layer, head)] if layer is not None else [
        (l, h) for l in range(num_layers) for h in range(num_heads)]
    rows, columns = (1, 1) if layer is not None else (num_layers, num_heads)
    labels = _drawable(maps.labels)
    fonts = _installed_fonts()
    # Inches per heat map: grow with the text, within bounds; labels sized to fit their rows.
    cell = min(max(2.0, 0.1 * length), 5.0) if layer is None else min(max(4.0, 0.25 * length),
                                                                       14.0)
    size = max(3.0, min(9.0, 0.8 * cell * 72 / length))
    with plt.rc_context({"font.family": fonts, "font.size": size, "axes.titlesize": 9}):
        figure, axes = plt.subplots(rows, columns, figsize=(cell * columns + 1.5, cell * rows),
                                    squeeze=False, constrained_layout=True)
        image = None
        for index, (l, h) in enumerate(cells):
            axis = axes[index // columns][index % columns]
            image = axis.imshow(maps.scores[l, h], vmin=0.0, vmax=1.0, cmap=cmap)
            axis.set_title(f"layer {l}, head {h}")
            axis.set_xticks(range(length))
            axis.set_yticks(range(length))
            bottom, left = index // columns == rows - 1, index % columns == 0
            axis.set_xticklabels(labels if bottom else [], rotation=90)
            axis.set_yticklabels(labels if left else [])
            if bottom:
                axis.set_xlabel("key (attended to)")
            if left:
                axis.set_ylabel("query (attending)")
        figure.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    return figure


def _installed_fonts():
    from matplotlib import font_manager

    names = {font.name for font in font_manager.fontManager.ttflist}
    return [name for name in _FONTS if name in names] or ["DejaVu Sans"]


def _drawable(labels):
    """Labels with every character no installed font of `_FONTS` has replaced by "U+XXXX"."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    covered = set()
    for name in _installed_fonts():
        path = font_manager.findfont(font_manager.FontProperties(family=name),
                                     fallback_to_default=False)
        covered.update(FT2Font(path).get_charmap())
    return ["".join(c if ord(c) in covered else f"U+{ord(c):04X}" for c in label)
            for label in labels]


def write_attention_page(maps, path, title="Attention"):
    """Writes a self-contained HTML page (no network: styles, script and data inline): the
    tokens of the text; hovering or clicking one shows, for the chosen layer and head (or the
    mean over heads), how much it attends to each earlier token (their background), and a grid
    of every layer × head for it."""
    data = {"labels": maps.labels,
            "scores": np.round(maps.scores.astype(np.float64), 4).tolist()}
    page = _PAGE.replace("__TITLE__", html.escape(title)).replace(
        "__DATA__", json.dumps(data, ensure_ascii=True).replace("</", "<\\/"))
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def write_attention_report(maps, out_dir, layer=0, head=0):
    """Writes `out_dir/attention-grid.png` (every layer × head), `out_dir/attention-L{l}-H{h}.png`
    (one head at full size) and `out_dir/attention.html`; returns their paths."""
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "attention-grid.png"),
             os.path.join(out_dir, f"attention-L{layer}-H{head}.png")]
    for path, (l, h) in zip(paths, [(None, None), (layer, head)]):
        figure = plot_attention(maps, layer=l, head=h)
        figure.savefig(path, dpi=110)
        plt.close(figure)
    paths.append(write_attention_page(maps, os.path.join(out_dir, "attention.html")))
    return paths


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font-family: system-ui, "Noto Sans CJK JP", sans-serif; margin: 1.5em; color: #222; }
#tokens { line-height: 2.4; font-size: 18px; max-width: 60em; }
.token { padding: 2px 3px; margin: 1px; border-radius: 3px; cursor: pointer;
         border: 1px solid #ccc; white-space: pre; }
.token.selected { outline: 2px solid #d62728; }
#grid { display: grid; gap: 4px; margin-top: 1em; }
.head { display: flex; gap: 1px; }
.head span { width: 12px; height: 12px; display: inline-block; }
.head.chosen { outline: 2px solid #d62728; }
label { margin-right: 1em; }
</style></head><body>
<h1>__TITLE__</h1>
<p>Hover over or click a token: the tokens it attends to light up (darker = more attention).
Rows of the grid below are layers, columns heads; each cell strip is the chosen token's attention
over the tokens; click a strip to choose that layer and head.</p>
<p><label>Layer <select id="layer"></select></label>
<label>Head <select id="head"></select></label></p>
<div id="tokens"></div>
<div id="grid"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const layers = data.scores.length, heads = data.scores[0].length, count = data.labels.length;
const layerSelect = document.getElementById("layer"), headSelect = document.getElementById("head");
let selected = count - 1;
function option(select, value, text) {
  const element = document.createElement("option");
  element.value = value; element.textContent = text; select.appendChild(element);
}
for (let l = 0; l < layers; l++) option(layerSelect, l, String(l));
option(headSelect, "mean", "mean of heads");
for (let h = 0; h < heads; h++) option(headSelect, h, String(h));
function weights(query) {
  const layer = data.scores[Number(layerSelect.value)];
  if (headSelect.value !== "mean") return layer[Number(headSelect.value)][query];
  return layer[0][query].map((_, key) =>
    layer.reduce((sum, head) => sum + head[query][key], 0) / heads);
}
const tokens = data.labels.map((label, index) => {
  const element = document.createElement("span");
  element.className = "token"; element.textContent = label; element.dataset.index = index;
  element.addEventListener("mouseenter", () => show(index));
  element.addEventListener("mouseleave", () => show(selected));
  element.addEventListener("click", () => { selected = index; show(index); });
  document.getElementById("tokens").appendChild(element);
  return element;
});
const grid = document.getElementById("grid");
grid.style.gridTemplateColumns = `repeat(${heads}, max-content)`;
const strips = [];
for (let l = 0; l < layers; l++) for (let h = 0; h < heads; h++) {
  const strip = document.createElement("div");
  strip.className = "head"; strip.title = `layer ${l}, head ${h}`;
  strip.addEventListener("click", () => {
    layerSelect.value = l; headSelect.value = h; show(selected);
  });
  for (let k = 0; k < count; k++) strip.appendChild(document.createElement("span"));
  grid.appendChild(strip); strips.push([l, h, strip]);
}
function show(query) {
  const row = weights(query);
  tokens.forEach((element, key) => {
    element.style.backgroundColor = `rgba(31, 119, 180, ${row[key].toFixed(4)})`;
    element.dataset.weight = row[key].toFixed(4);
    element.classList.toggle("selected", key === query);
  });
  for (const [l, h, strip] of strips) {
    strip.classList.toggle("chosen", String(l) === layerSelect.value &&
                                    String(h) === headSelect.value);
    data.scores[l][h][query].forEach((weight, key) => {
      strip.children[key].style.backgroundColor = `rgba(214, 39, 40, ${weight.toFixed(4)})`;
    });
  }
}
layerSelect.addEventListener("change", () => show(selected));
headSelect.addEventListener("change", () => show(selected));
show(selected);
</script></body></html>
"""
