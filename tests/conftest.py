"""Shared test set-up. Each area keeps its fixtures in tests/fixtures/<area>.py."""

from __future__ import annotations

import os

import pytest

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fine-tuning tests first (a stable sort: the rest keep their order).

    They take one to three minutes each. Under pytest-xdist a worker takes the next test
    as it finishes one, so the long ones, started first, overlap the hundreds of short
    ones instead of ending the run alone on one worker while the other waits.
    """
    items.sort(key=lambda item: item.path.name not in LONGEST_FILES)


# The files whose tests take minutes (the fine-tuning loop end to end), measured.
LONGEST_FILES = frozenset({"test_tune_loop.py", "test_tune_cli.py"})
