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


def test_security_md_names_tests_that_exist():
    """Every [`test_…`] cited as a defence's proof is a real test."""
    cited = set(re.findall(r"`(test_[a-z0-9_]+)`", (REPO / "docs/security.md").read_text()))
    defined = set()
    for path in (REPO / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^(?:async )?def (test_[a-z0-9_]+)", path.read_text(), re.M))
    assert cited - defined == set()
