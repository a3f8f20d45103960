"""The suite's own rules: in CI (CI=true) nothing is skipped for lack of a package the test command installs."""
from __future__ import annotations

import re

import pytest

from conftest import REPO, require_package


def test_a_missing_package_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no_such_package_dp is missing"):
        require_package("no_such_package_dp", "requirements.txt")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no_such_package_dp is not installed"):
        require_package("no_such_package_dp", "requirements.txt")
    assert require_package("onnx", "requirements.txt").__name__ == "onnx"


def test_no_test_skips_a_missing_package_with_importorskip():
    # importorskip skips in CI too; require_package (or a CI check before skipping) fails there instead
    offenders = [f"{path.name}:{i}" for path in sorted((REPO / "tests").rglob("*.py"))
                 if path.name != "test_suite_rules.py"
                 for i, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"importorskip\(", line) and "CI" not in line]
    assert not offenders, offenders
