"""The ``root`` marker (tests/conftest.py): skips for other users, fails under CI."""

from __future__ import annotations

import os

import pytest

from tests.conftest import pytest_runtest_setup


class _Item:
    def __init__(self, marked: bool) -> None:
        self._mark = pytest.mark.root(reason="needs root (to test)").mark if marked else None

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return self._mark if name == "root" else None


def _as_user(monkeypatch: pytest.MonkeyPatch, ci: bool) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    if ci:
        monkeypatch.setenv("CI", "1")
    else:
        monkeypatch.delenv("CI", raising=False)


def test_a_root_test_skips_for_another_user_with_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _as_user(monkeypatch, ci=False)
    with pytest.raises(pytest.skip.Exception, match="needs root \\(to test\\)"):
        pytest_runtest_setup(_Item(marked=True))  # type: ignore[arg-type]


def test_under_ci_a_root_test_run_as_another_user_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    _as_user(monkeypatch, ci=True)
    with pytest.raises(pytest.fail.Exception, match="CI must run it as root"):
        pytest_runtest_setup(_Item(marked=True))  # type: ignore[arg-type]


def test_unmarked_tests_and_root_runs_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    _as_user(monkeypatch, ci=True)
    pytest_runtest_setup(_Item(marked=False))  # type: ignore[arg-type]
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    pytest_runtest_setup(_Item(marked=True))  # type: ignore[arg-type]
