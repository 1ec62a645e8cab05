"""The progress protocol long-running library calls report to (the CLI draws it with rich)."""

from __future__ import annotations

from typing import Protocol


class ProgressHook(Protocol):
    def start(self, stage: str, total: int | None) -> None: ...
    def advance(self, stage: str, n: int = 1) -> None: ...
    def done(self, stage: str) -> None: ...


class NullProgress:
    """Does nothing; the default when no hook is given."""

    def start(self, stage: str, total: int | None) -> None:
        pass

    def advance(self, stage: str, n: int = 1) -> None:
        pass

    def done(self, stage: str) -> None:
        pass
