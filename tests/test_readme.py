"""The README's quickstart runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs():
    text = README.read_text()
    block = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    with torch.no_grad():
        exec(compile(block, "README quickstart", "exec"), scope)
    model, logits = scope["model"], scope["logits"]
    assert logits.shape == (4, 1000)
    assert scope["resid"].shape == (model.cfg.n_layers + 1, 4, model.cfg.n_tokens, model.cfg.d_model)
    assert not torch.allclose(scope["patched"], logits)
