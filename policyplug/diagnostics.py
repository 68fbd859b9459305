"""Diagnostics: every error names the file, line and column and shows the line with a caret.

Errors are collected, not raised one by one, so that `policyplug check` reports every
problem of a policy in one run (like a compiler, unlike a first-error-wins parser).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Location:
    """A place in a policy source: 1-based line and column, and the length to underline."""

    file: str
    line: int
    column: int
    length: int = 1


@dataclass(frozen=True, slots=True)
class Diagnostic:
    location: Location
    message: str
    severity: str = "error"
    source_line: str | None = None

    def format(self) -> str:
        loc = self.location
        head = f"{loc.file}:{loc.line}:{loc.column}: {self.severity}: {self.message}"
        if self.source_line is None:
            return head
        gutter = f"{loc.line:>5} | "
        caret_pad = " " * (len(gutter) - 2) + "| "
        # Tabs keep their width so the caret stays under the right character.
        prefix = "".join(c if c == "\t" else " " for c in self.source_line[: max(loc.column - 1, 0)])
        width = max(1, min(loc.length, max(1, len(self.source_line) - loc.column + 1)))
        return f"{head}\n{gutter}{self.source_line}\n{caret_pad}{prefix}{'^' * width}"

    def __str__(self) -> str:
        return self.format()


class PolicyError(Exception):
    """A policy could not be loaded; `diagnostics` holds every problem found."""

    def __init__(self, diagnostics: Iterable[Diagnostic]):
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        super().__init__(self.format())

    def format(self) -> str:
        return "\n".join(d.format() for d in self.diagnostics)


@dataclass
class DiagnosticSink:
    """Collects diagnostics for one load; knows each file's text to quote the line."""

    sources: dict[str, list[str]] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    # Problems that do not stop the load (the policy means something, perhaps not what was meant)
    warnings: list[Diagnostic] = field(default_factory=list)

    def add_source(self, file: str, text: str) -> None:
        self.sources[file] = text.splitlines()

    def error(self, location: Location, message: str) -> None:
        self.diagnostics.append(Diagnostic(location, message, "error", self._source_line(location)))

    def warning(self, location: Location, message: str) -> None:
        self.warnings.append(Diagnostic(location, message, "warning", self._source_line(location)))

    def _source_line(self, location: Location) -> str | None:
        lines = self.sources.get(location.file)
        if lines is not None and 1 <= location.line <= len(lines):
            source_line = lines[location.line - 1]
            if len(source_line) <= 300:  # keep a huge one-line file from flooding the terminal
                return source_line
        return None

    @property
    def failed(self) -> bool:
        return bool(self.diagnostics)

    def raise_if_failed(self) -> None:
        if self.diagnostics:
            ordered = sorted(
                self.diagnostics, key=lambda d: (d.location.file, d.location.line, d.location.column)
            )
            raise PolicyError(ordered)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
