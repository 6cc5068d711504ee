"""The two public-domain novels shipped with kiln, as plain text and as sentences.

Pride and Prejudice is evaluation text, Sense and Sensibility calibration text: keeping the sources apart means a
compile is never verified on the data it was calibrated on.
"""

from __future__ import annotations

import re
from importlib import resources

import numpy as np

EVALUATION_BOOK = "prideprejudice.txt"
CALIBRATION_BOOK = "sensesensibility.txt"

_ABBREVIATION = re.compile(r"\b(Mr|Mrs|Dr|St|Col)\.")
_SENTENCE = re.compile(r"[^.!?]+[.!?]+[\"'’”_]*")


def read_book(filename: str) -> str:
    """The full text of one shipped book."""
    return (resources.files("kiln.zoo") / "data" / filename).read_text(encoding="utf-8")


def sentences(text: str, count: int, min_words: int = 8, max_words: int = 60) -> list[str]:
    """``count`` sentences spread evenly over the whole text (deterministic).

    Sentences split at . ! ? but not after titles such as "Mr."; very short ones (headings, exclamations) and
    very long ones are skipped so each is a typical embedding input.
    """
    found: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = _ABBREVIATION.sub(r"\1\0", re.sub(r"\s+", " ", paragraph))
        for match in _SENTENCE.findall(flat):
            sentence = match.strip().replace("\0", ".")
            if min_words <= len(sentence.split()) <= max_words:
                found.append(sentence)
    if len(found) < count:
        raise ValueError(f"text has {len(found)} usable sentences, {count} wanted")
    picks = np.linspace(0, len(found) - 1, count).round().astype(int)
    return [found[i] for i in picks]
