"""Shared test set-up. Each area keeps its fixtures in tests/fixtures/<area>.py."""

from __future__ import annotations

import os

# Nothing may download weights or vocabularies during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = [
    "tests.fixtures.store",
    "tests.fixtures.llm",
    "tests.fixtures.discord",
    "tests.fixtures.knowledge",
    "tests.fixtures.local",
    "tests.fixtures.service",
    "tests.fixtures.tune",
    "tests.fixtures.export",
]
