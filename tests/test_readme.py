"""The README's Python examples run as written (so the docs cannot drift from the code)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch):
    with open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)  # the examples write model.keras
    namespace = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 1, 65)
    assert namespace["classifier"].output_shape == (None, 2)
    assert [len(row) for row in namespace["ids"]] == [5, 5]
    assert isinstance(namespace["text"], str)
    assert namespace["attention_scores"].shape == (1, 2, 2, 3, 3)  # [B, L, H, T, T]
    assert namespace["maps"].scores.shape == (2, 2, 7, 7)
    assert [len(score.token_log_probs) for score in namespace["scores"]] == [3, 3]
