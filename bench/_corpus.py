"""A deterministic, English-like document corpus for the knowledge benchmarks."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

WORDS = (
    "the of and to in is was for that on with as by at from it be this are or an have not which but were all "
    "been has their more one can will when there would what so if about into out up time them other than then "
    "its only two over also after new first may some could these any like how our where most made through back "
    "years work well way even because good each those people state how many before must under life system "
    "water customer order warranty blender kettle motor jar lid refund shipping delivery invoice account "
    "password network router firmware update battery charger cable screen printer scanner office meeting "
    "policy travel expense holiday schedule project budget report server database backup security access "
    "device sensor temperature pressure valve pump filter engine brake wheel door window heating cooling "
    "garden kitchen recipe flour sugar butter oven bread coffee tea milk cheese apple river mountain forest "
    "city street market train station airport ticket hotel room price discount payment receipt contract "
    "manager team employee training safety incident alarm emergency exit floor building parking permit "
    "install configure restart connect disconnect reset replace clean descale inspect repair measure adjust "
    "quickly carefully daily weekly monthly always never usually often sometimes before after during until"
).split()


_SYLLABLES = "ka to ri men sa lo ber vin dal or es un tra pel gor fi nu zel mar qui".split()
# A long tail of rarer words (names, jargon), as real documents have: 8,400 made-up words
# drawn with Zipf-like frequencies.
RARE_WORDS = [a + b for a in _SYLLABLES for b in _SYLLABLES] + [
    a + b + c for a in _SYLLABLES for b in _SYLLABLES for c in _SYLLABLES
]
_RARE_CUMULATIVE = list(
    itertools.accumulate(1 / (rank + 1) ** 1.07 for rank in range(len(RARE_WORDS)))
)


def rare_words(rng: random.Random, count: int) -> list[str]:
    """`count` words from the long tail."""
    return rng.choices(RARE_WORDS, cum_weights=_RARE_CUMULATIVE, k=count)


def sentence(rng: random.Random, rare: float = 0.0) -> str:
    """One sentence of 8 to 20 words (a `rare` share from the long tail), with the odd product code or number."""
    size = rng.randint(8, 20)
    words = [rng.choice(WORDS) for _ in range(size)]
    if rare:
        for i, word in zip(
            rng.sample(range(size), round(size * rare)),
            rare_words(rng, round(size * rare)),
            strict=True,
        ):
            words[i] = word
    if rng.random() < 0.3:
        words.insert(
            rng.randrange(len(words)), f"{rng.choice('ABCDEFGH')}-{rng.randint(100, 9999)}"
        )
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), str(rng.randint(2, 500)))
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 7)))


def write_corpus(folder: Path, *, files: int, sections: int, seed: int = 7) -> list[Path]:
    """Markdown files of `sections` headed sections with a few paragraphs each."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(files):
        parts = [f"# Handbook part {n}\n"]
        for s in range(sections):
            parts.append(f"## Section {n}.{s}: {rng.choice(WORDS)} {rng.choice(WORDS)}\n")
            parts.extend(paragraph(rng) + "\n" for _ in range(rng.randint(2, 4)))
        path = folder / f"part-{n:03d}.md"
        path.write_text("\n".join(parts), encoding="utf-8")
        paths.append(path)
    return paths


def passages(rng: random.Random, count: int) -> list[str]:
    """`count` passage texts of about one chunk each, a quarter of their words from the long tail."""
    return [
        " ".join(sentence(rng, rare=0.25) for _ in range(rng.randint(5, 9))) for _ in range(count)
    ]
