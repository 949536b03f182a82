"""Fine-tuning datasets from the log: five formats, filtered, redacted, validated, split.

The adapters (`switchboard export`, `/export`) build `ExportOptions` and call
`Exporter.run`, which `bot.app.open_app` builds with the app's sessions, token counter
and model registry. See `run` for how an export goes, `formats` for the five formats and
their rules, `redact` for what personal data goes, `select` for the SQL, `prompts` for the logged prompts
that `switchboard eval --from-log` tries models on, `manifest` for
what is recorded beside the files, `prune` for taking lines out of an export made with
sources once what they were built from is deleted.
"""

from store.export.options import (
    FORMAT_HELP,
    FORMATS,
    ExportOptions,
    Format,
    parse_format,
    parse_when,
)
from store.export.prompts import LoggedPrompt, LoggedPrompts, logged_prompts
from store.export.run import (
    MIN_EXAMPLES,
    Exporter,
    ExportFile,
    ExportSummary,
    MessageCounter,
    ModelTarget,
    Progress,
    SourcesFile,
    check_writable,
    manifest_path,
    output_paths,
    removed_text,
    sources_path,
)

__all__ = [
    "FORMATS",
    "FORMAT_HELP",
    "MIN_EXAMPLES",
    "ExportFile",
    "ExportOptions",
    "ExportSummary",
    "Exporter",
    "Format",
    "LoggedPrompt",
    "LoggedPrompts",
    "MessageCounter",
    "ModelTarget",
    "Progress",
    "SourcesFile",
    "check_writable",
    "logged_prompts",
    "manifest_path",
    "output_paths",
    "parse_format",
    "parse_when",
    "removed_text",
    "sources_path",
]
