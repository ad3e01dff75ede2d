"""The README's library snippet runs as written (on the tiny model it builds) and returns what it says."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tests/test_readme.py executes the python block below"


def marked_python_blocks(text: str) -> list[str]:
    """Python code blocks that directly follow the marker comment."""
    return re.findall(re.escape(MARKER) + r"[^\n]*\n```python\n(.*?)```", text, flags=re.S)


def test_the_readme_marks_its_library_snippet():
    assert len(marked_python_blocks(README.read_text())) == 1


def test_the_library_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippet writes outputs/tiny/base-model relative to where it runs
    namespace: dict = {}
    exec(compile(marked_python_blocks(README.read_text())[0], str(README), "exec"), namespace)
    scores, queries, pages = namespace["scores"], namespace["queries"], namespace["pages"]
    assert scores.shape == (1, 1) and torch.isfinite(scores).all()
    assert not any(t.requires_grad for t in [scores, *queries, *pages])
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(namespace["model"].parameters()).device.type == expected
    assert (tmp_path / "outputs/tiny/base-model/config.json").exists()
