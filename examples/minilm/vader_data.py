"""Sentiment polarity of the VADER lexicon: a small, real, human-labelled task that ships offline.

``vaderSentiment`` ships ``vader_lexicon.txt``: about 7,500 English words, slang and emoticons, each with the
mean valence (−4 … +4) that ten human raters gave it. The task: is an entry negative (mean ≤ −1) or positive
(mean ≥ 1)? Entries in between are left out. The split is fixed by a seed.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
    texts: tuple[str, ...]
    labels: np.ndarray  # int32, 1 = positive

    def __len__(self) -> int:
        return len(self.texts)


def lexicon_path() -> str:
    """Path of ``vader_lexicon.txt`` inside the installed ``vaderSentiment`` package."""
    import vaderSentiment

    return os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")


def read_lexicon(path: str | None = None) -> list[tuple[str, float]]:
    """``(token, mean rating)`` for every line of the lexicon."""
    entries = []
    with open(path or lexicon_path(), encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                continue
            try:
                entries.append((parts[0], float(parts[1])))
            except ValueError:
                raise ValueError(f"{path or lexicon_path()}:{number}: no numeric rating in {line!r}") from None
    return entries


def polarity_splits(
    threshold: float = 1.0, fractions: tuple[float, float] = (0.8, 0.1), seed: int = 0, path: str | None = None
) -> dict[str, Split]:
    """Train / validation / test splits of the polarity task (the rest of ``fractions`` goes to test).

    Example:
        >>> splits = polarity_splits()
        >>> sorted(splits), len(splits["train"]) > len(splits["test"])
        (['test', 'train', 'validation'], True)
    """
    labelled = [(token, int(mean > 0)) for token, mean in read_lexicon(path) if abs(mean) >= threshold]
    return labelled_splits(labelled, fractions, seed)


def labelled_splits(
    labelled: list[tuple[str, int]], fractions: tuple[float, float] = (0.8, 0.1), seed: int = 0
) -> dict[str, Split]:
    """Train / validation / test splits of ``(text, label)`` pairs, shuffled by ``seed``.

    Example:
        >>> splits = labelled_splits([("good", 1), ("bad", 0)] * 5)
        >>> [len(splits[name]) for name in ("train", "validation", "test")]
        [8, 1, 1]
    """
    order = np.random.default_rng(seed).permutation(len(labelled))
    n_train = int(fractions[0] * len(order))
    n_validation = int(fractions[1] * len(order))
    parts = {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_validation],
        "test": order[n_train + n_validation :],
    }
    return {
        name: Split(tuple(labelled[i][0] for i in index), np.array([labelled[i][1] for i in index], np.int32))
        for name, index in parts.items()
    }
