"""What can go wrong while preparing, training or exporting: one line a person can act on each."""

from __future__ import annotations

from core.errors import ConfigError, UserError


class TuneError(UserError):
    """A fine-tuning step failed; the message says why and what to do."""


class DatasetError(TuneError, ConfigError):
    """The training file cannot be used (missing, not JSONL, wrong shape, too few rows)."""


class TooFewRows(DatasetError):
    """The training file has fewer usable conversations than training needs."""


class BaseNotLoadable(TuneError):
    """transformers cannot load (or train) this base model."""


class NotEnoughDisk(TuneError):
    """The folder for the converted base or the adapter lacks the space it needs."""


class TrainingFailed(TuneError):
    """The training process stopped with an error."""


class TrainingCancelled(TuneError):
    """Training was cancelled before it finished; nothing was kept."""


class ExportError(TuneError):
    """The adapter cannot be written as a GGUF LoRA for this base."""
