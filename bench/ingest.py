"""ingest: passages per second of `switchboard knowledge add` vs. raw SentenceTransformer.encode.

A generated English-like corpus of ~2,000 passages (Markdown files with headed sections)
is added to a fresh embedded Chroma by the real `switchboard knowledge add` command, run
in this process (so Python's one-off `import sentence_transformers` is not counted, but
everything the command does is: settings, Chroma, loading the model from disk, reading,
splitting, embedding, storing, the keyword index and the report). The baseline encodes the
very same passage texts with one `SentenceTransformer.encode` call on an already loaded
model. The two alternate for ROUNDS rounds (each command into a fresh data folder) and
each side's best run is compared: on a shared machine other work only ever slows a run.
The baseline runs in a worker thread, as the command's encoding does: on a busy machine
here, encoding from a worker thread measured up to 1.7x faster than from the main
thread, and the baseline should be the faster of the two.

Last line: `ingest: ratio X (goal >= 0.85)`, X = command rate / raw encode rate.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from bench._corpus import write_corpus
from bot.cli_knowledge import knowledge_app
from knowledge.embeddings import LocalEmbedder
from knowledge.loaders import parse
from knowledge.splitter import split_sections

FILES = 40
SECTIONS = 22
CHUNK_CHARS = 900
GOAL = 0.85
ROUNDS = 2


def main() -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-ingest-") as tmp:
        root = Path(tmp)
        paths = write_corpus(root / "corpus", files=FILES, sections=SECTIONS)
        texts = [
            chunk.text
            for path in paths
            for chunk in split_sections(
                parse(path.name, path.read_bytes(), max_bytes=1 << 30), CHUNK_CHARS
            )
        ]
        console.print(
            f"corpus: {len(paths)} files, {len(texts):,} passages, {sum(p.stat().st_size for p in paths) / 1e6:.1f} MB"
        )

        embedder = LocalEmbedder()
        with console.status("loading the model for the baseline…"):
            model = embedder.load()
            model.encode(
                texts[:64], batch_size=32, normalize_embeddings=True, show_progress_bar=False
            )

        def raw() -> float:
            def encode() -> float:
                start = time.perf_counter()
                model.encode(
                    texts,
                    batch_size=32,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
                return time.perf_counter() - start

            with ThreadPoolExecutor(max_workers=1) as pool:
                return pool.submit(encode).result()

        env = {
            "SWITCHBOARD_KNOWLEDGE_CHUNK_CHARS": str(CHUNK_CHARS),
            "SWITCHBOARD_EMBEDDING_PROVIDER": "local",
            "SWITCHBOARD_EMBEDDING_MODEL": "",
            "CHROMA_HOST": "",
            "HF_HUB_OFFLINE": "1",
        }

        def command(round_: int) -> float:
            start = time.perf_counter()
            result = CliRunner().invoke(
                knowledge_app,
                ["add", str(root / "corpus"), "--guild", "1"],
                env={**env, "SWITCHBOARD_DATA_DIR": str(root / f"data{round_}")},
            )
            elapsed = time.perf_counter() - start
            if result.exit_code != 0:
                console.print(result.output)
                raise SystemExit(f"the command failed with exit code {result.exit_code}")
            if f"{len(texts)} passages stored" not in result.output:
                console.print(result.output[-2000:])
                raise SystemExit(
                    "the command stored a different number of passages than the baseline encodes"
                )
            return elapsed

        raws: list[float] = []
        commands: list[float] = []
        for round_ in range(ROUNDS):
            with console.status(f"raw encode ({round_ + 1}/{ROUNDS})…"):
                raws.append(raw())
            with console.status(
                f"switchboard knowledge add ({round_ + 1}/{ROUNDS}), into a fresh data folder…"
            ):
                commands.append(command(round_))

    # Other work on a shared machine only ever slows a run down: compare each side's best.
    raw_rate = len(texts) / min(raws)
    command_rate = len(texts) / min(commands)
    table = Table(title=f"ingest: {len(texts):,} passages")
    for column in ("round", "raw encode s", "passages/s", "knowledge add s", "passages/s"):
        table.add_column(column, justify="right")
    for n, (r, c) in enumerate(zip(raws, commands, strict=True), start=1):
        table.add_row(
            str(n), f"{r:.2f}", f"{len(texts) / r:.1f}", f"{c:.2f}", f"{len(texts) / c:.1f}"
        )
    console.print(table)
    ratio = command_rate / raw_rate
    print(f"ingest: ratio {ratio:.3f} (goal >= {GOAL})")
    return 0
