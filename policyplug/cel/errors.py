"""Errors raised when a CEL expression is evaluated."""

from __future__ import annotations


class CelEvaluationError(Exception):
    """An evaluation error of a CEL expression (message is human readable)."""
