"""A small preference dataset a tiny random model learns in a few dozen steps (for fast tests).

The request asks to shout or to whisper a word; the chosen answer writes it in capitals ("PEAR.") or
in lower case ("pear.") as asked, the rejected one the other way. Answers differ only in the case of
their letters and which case is right depends on the request, so an untrained model is at chance. The built-in dataset needs a stage-1 trunk and ~900 steps to reach 0.9; this
one checks the stage-2 machinery (loss, accuracy, saving) in seconds.
"""
from __future__ import annotations

import json
import random

WORDS = ["apple", "pear", "plum", "grape", "lemon", "melon", "peach", "cherry", "mango", "kiwi", "fig",
         "lime", "date", "olive", "bean", "pea", "leek", "corn", "rice", "wheat", "oat", "rye", "nut", "seed"]


def write_easy_pairs(path: str, num_pairs: int = 1000, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num_pairs):
            word = rng.choice(WORDS)
            loud, quiet = f" {word.upper()}.", f" {word}."
            if rng.random() < 0.5:
                row = {"prompt": f"Shout {word}.", "chosen": loud, "rejected": quiet}
            else:
                row = {"prompt": f"Whisper {word}.", "chosen": quiet, "rejected": loud}
            f.write(json.dumps(row) + "\n")
    return path
