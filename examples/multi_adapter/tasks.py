"""Four binary text tasks built from the labelled data that ``vaderSentiment`` ships (nothing is downloaded).

- ``polarity``: the main example's task -- is a VADER lexicon entry negative (mean valence ≤ −1) or positive
  (≥ 1)? Same entries and split as ``examples/minilm``.
- ``intensity``: among those polar entries, is the feeling strong (|mean| ≥ 2) or mild (1 ≤ |mean| < 2)?
- ``emotive``: does an entry carry sentiment at all (|mean| ≥ 1) or is it nearly neutral (|mean| < 1)? The
  larger class is subsampled to the size of the smaller one.
- ``flag``: ``emoji_utf8_lexicon.txt`` maps each emoji to its English (CLDR) name. Is the name that of a country
  or region -- the emoji is a flag, read from its code points (regional indicators, or a black flag with tag
  characters for England, Scotland, Wales) -- or of any other emoji? Skin-tone variants are folded into one
  name; the other names are subsampled to the number of flags. It asks for world knowledge (``Guinea`` is a
  flag, ``Gemini`` and ``egg`` are not) rather than sentiment.

Each task is split 80/10/10 by a fixed seed, like the main example.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "minilm"))

from vader_data import Split, labelled_splits, polarity_splits, read_lexicon  # noqa: E402

TASKS = ("polarity", "intensity", "emotive", "flag")
LABELS = {
    "polarity": ("negative", "positive"),
    "intensity": ("mild", "strong"),
    "emotive": ("neutral", "emotive"),
    "flag": ("other emoji", "country flag"),
}

_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F1FF + 1)
_TAGS = range(0xE0020, 0xE007F + 1)
_BLACK_FLAG = 0x1F3F4


def emoji_lexicon_path() -> str:
    """Path of ``emoji_utf8_lexicon.txt`` inside the installed ``vaderSentiment`` package."""
    import vaderSentiment

    return os.path.join(os.path.dirname(vaderSentiment.__file__), "emoji_utf8_lexicon.txt")


def is_flag(emoji: str) -> bool:
    """A country/region flag: two regional indicators, or a black flag followed by tag characters."""
    points = [ord(c) for c in emoji]
    if len(points) == 2 and all(p in _REGIONAL_INDICATORS for p in points):
        return True
    return len(points) > 1 and points[0] == _BLACK_FLAG and all(p in _TAGS for p in points[1:])


def _balanced(labelled: list[tuple[str, int]], seed: int) -> list[tuple[str, int]]:
    """Subsample the larger class to the size of the smaller (order kept, chosen by ``seed``)."""
    by_label = [[pair for pair in labelled if pair[1] == label] for label in (0, 1)]
    size = min(map(len, by_label))
    rng = np.random.default_rng(seed)
    keep = [set(rng.choice(len(group), size, replace=False).tolist()) for group in by_label]
    return [pair for label, group in enumerate(by_label) for i, pair in enumerate(group) if i in keep[label]]


def _emoji_names(path: str | None = None) -> list[tuple[str, int]]:
    names: dict[str, int] = {}
    with open(path or emoji_lexicon_path(), encoding="utf-8") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                continue
            name = re.sub(r":[^:]*skin tone.*$", "", parts[1]).strip()
            names.setdefault(name, int(is_flag(parts[0])))
    return sorted(names.items())


def task_splits(task: str, seed: int = 0) -> dict[str, Split]:
    """Train / validation / test splits of one of ``TASKS`` (label 1 = the second name in ``LABELS[task]``).

    Example:
        >>> splits = task_splits("flag")
        >>> sorted(splits), set(splits["train"].labels.tolist())
        (['test', 'train', 'validation'], {0, 1})
    """
    if task == "polarity":
        return polarity_splits(seed=seed)
    if task == "flag":
        return labelled_splits(_balanced(_emoji_names(), seed), seed=seed)
    lexicon = read_lexicon()
    if task == "intensity":
        labelled = [(token, int(abs(mean) >= 2.0)) for token, mean in lexicon if abs(mean) >= 1.0]
    elif task == "emotive":
        labelled = _balanced([(token, int(abs(mean) >= 1.0)) for token, mean in lexicon], seed)
    else:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return labelled_splits(labelled, seed=seed)
