"""
The example in docs/testing-policies.md runs as written.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_testing_policies_example(tmp_path, monkeypatch):
    text = (REPO / "docs/testing-policies.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    example = tmp_path / "test_example.py"
    example.write_text(code)
    monkeypatch.chdir(REPO)
    result = pytest.main(["-q", "-p", "no:cacheprovider", str(example)])
    assert result == 0
