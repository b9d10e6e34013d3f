"""The report's linked pages and wording: the circuitsvis attention views embed numbers rounded to the stated
decimals (not float32 values widened to 17 digits), and the SAE step names its token selection in words."""

import json
import re

import numpy as np
import pytest
import torch

from mechvit.study.steps.sae import token_words
from mechvit.viz.circuits import attention_views_page


def _embedded_attention(page: str) -> list[list]:
    return [
        json.loads(m)["attention"]
        for m in re.findall(r"CircuitsVis\.AttentionHeads, (\{.*?\})\);</script>", page, flags=re.S)
    ]


@pytest.mark.parametrize("decimals", [3, 2])
def test_attention_views_embed_at_most_the_stated_decimals(decimals):
    g = torch.Generator().manual_seed(0)
    pattern = torch.softmax(3 * torch.randn(2, 2, 5, 5, generator=g), -1)  # [layers, heads, T, T] float32
    pattern[0, 0, 0] = torch.tensor([0.009, 0.001, 0.29, 0.7, 0.0])  # 0.009f widens to 0.008999999612569809
    tokens = ["CLS", "r0c0", "r0c1", "r1c0", "r1c1"]
    page = attention_views_page(
        [{"title": "v", "pattern": pattern}], tokens, decimals=decimals, bundle_src="cv.js"
    )
    (att,) = _embedded_attention(page)
    np.testing.assert_allclose(np.array(att), np.round(pattern.reshape(4, 5, 5).double().numpy(), decimals))
    section = page[page.index("AttentionHeads") :]
    numbers = re.findall(r"-?\d+\.(\d+)", section[: section.index("</script>")])
    assert numbers and max(len(d) for d in numbers) <= decimals  # every embedded number, as written
    if decimals == 3:
        assert att[0][0][:2] == [0.009, 0.001] and "0.008999" not in page


def test_token_selection_in_words():
    assert token_words("patches") == "patch tokens"
    assert token_words("all") == "all tokens" and token_words("cls") == "class token"
    assert token_words("prefix") == "prefix tokens"
