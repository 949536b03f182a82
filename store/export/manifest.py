"""The manifest beside every export: what was asked, what was written, what was left out.

`<name>.manifest.json` records the options (the filters), the counts (candidates,
examples, tokens, and what each filter and check removed), each file's size and sha256,
the redaction policy and the placeholders written, the database's schema revision, the
estimated training cost, and, for KTO, the desirable and undesirable counts with the
weights that balance them; with provenance, each data file's sidecar. It is written like
the data: to a temporary file, renamed. When a forget or retention later removes lines
from the files (`prune`), their counts and hashes are brought up to date and
`removed_later` records how many lines went, when and why (never whose).
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from store.export.options import ExportOptions
    from store.export.run import ExportSummary

MANIFEST_VERSION = 1


def kto_weights(desirable: int, undesirable: int) -> dict[str, float]:
    """Counts and KTOTrainer weights that balance them.

    TRL's advice: upweight the rarer kind so that desirable_weight × desirable over
    undesirable_weight × undesirable lies between 1:1 and 4:3. The commoner kind keeps
    weight 1; the rarer gets their ratio, rounded to two decimals on the side that keeps
    the result in that range.
    """
    weights = {"desirable_weight": 1.0, "undesirable_weight": 1.0}
    if desirable and undesirable:
        if desirable < undesirable:  # more weight on the desirable side: round up
            weights["desirable_weight"] = math.ceil(undesirable / desirable * 100) / 100
        elif undesirable < desirable:  # more weight on the undesirable side: round down
            weights["undesirable_weight"] = math.floor(desirable / undesirable * 100) / 100
    ratio = (
        weights["desirable_weight"] * desirable / (weights["undesirable_weight"] * undesirable)
        if desirable and undesirable
        else None
    )
    return {
        "desirable": desirable,
        "undesirable": undesirable,
        **weights,
        **({"ratio": round(ratio, 4)} if ratio is not None else {}),
    }


def manifest(
    summary: ExportSummary,
    options: ExportOptions,
    *,
    revision: str | None,
    created_at: datetime,
    redaction: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of an export, as JSON-ready data."""
    splits = {f.split: f.examples for f in summary.files}
    data: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "created_at": created_at.isoformat(),
        "format": summary.format,
        "database_revision": revision,
        "filters": options.as_json(),
        "counts": {
            "candidates": summary.candidates,
            "examples": summary.examples,
            "tokens": summary.tokens,
            **(
                {"train": splits["train"], "validation": splits["validation"]}
                if "train" in splits
                else {}
            ),
        },
        # Candidates each filter and check left out, in the order they were applied
        # (for the pair formats, the last four count pairs).
        "removed": summary.removed,
        "files": [
            {
                "name": f.path.name,
                "split": f.split,
                "examples": f.examples,
                "tokens": f.tokens,
                "bytes": f.bytes,
                "sha256": f.sha256,
                # The provenance sidecar (only where asked for: a fine-tune's snapshot).
                **(
                    {
                        "sources": {
                            "name": f.sources.path.name,
                            "bytes": f.sources.bytes,
                            "sha256": f.sources.sha256,
                        }
                    }
                    if f.sources is not None
                    else {}
                ),
            }
            for f in summary.files
        ],
        "redaction": {**redaction, "placeholders": summary.placeholders},
        "estimated_training_cost_usd": (
            round(summary.cost_usd, 6) if summary.cost_usd is not None else None
        ),
        "priced_examples": summary.priced_examples,
        "warnings": list(summary.warnings),
    }
    if summary.kto is not None:
        data["kto"] = summary.kto
    return data


def write_manifest(
    summary: ExportSummary,
    options: ExportOptions,
    *,
    revision: str | None,
    created_at: datetime,
    redaction: dict[str, Any],
) -> None:
    """Write the manifest beside the data (temporary file first, then renamed)."""
    data = manifest(summary, options, revision=revision, created_at=created_at, redaction=redaction)
    path = summary.manifest
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temp, path)
