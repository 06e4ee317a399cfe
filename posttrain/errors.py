"""One exception family. Every error says what went wrong, where, and how to fix it.

The CLI prints ``str(error)`` as one paragraph and exits non-zero; ``--debug`` adds the traceback.
"""

from __future__ import annotations


class PosttrainError(Exception):
    """Base class: ``what`` happened at ``where`` (file:row, config key, ...); ``fix`` says what to do."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(f"Fix: {self.fix}")
        return " ".join(p.rstrip() if p.rstrip()[-1:] in ".?!" else p.rstrip() + "." for p in parts)


class ConfigError(PosttrainError):
    """A config key is unknown, mistyped or impossible. Raised before any data or model loads."""


class DataError(PosttrainError):
    """A dataset file, row or field is missing or malformed."""


class ModelError(PosttrainError):
    """A model or tokenizer cannot be loaded or does not fit the command."""


class TrainingError(PosttrainError):
    """Training cannot continue (non-finite loss, bad checkpoint, ...)."""


class ServiceError(PosttrainError):
    """A server, database or remote endpoint failed."""
