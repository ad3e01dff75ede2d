"""Make an optional kernel package look not installed, for the tests of what its absence logs."""

from __future__ import annotations

import importlib.util

from colquant.kernels import backend


def hide_package(monkeypatch, name: str) -> None:
    """`importlib.util.find_spec(name)` finds nothing (the probe the optional-package checks use), and
    `warn_once` forgets what it already logged, so the test sees the message again."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda wanted, *a: None if wanted == name else real(wanted, *a))
    monkeypatch.setattr(backend, "_WARNED", set())
