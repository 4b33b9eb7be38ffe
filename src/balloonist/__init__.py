"""balloonist: share one host's memory among many virtual machines by ballooning."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
