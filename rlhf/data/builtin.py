"""The built-in dataset: small-world instructions with an objective preference.

Generated deterministically by code (no files), so `python -m rlhf.train` runs with no data and its
outcome can be checked. Every prompt is a short request from one of nine tasks. Five transform a
word (the answer's form must follow the instruction), four ask a small-world fact:

  shout     "Shout the word pear."              -> " PEAR!"
  twice     "Say pear twice."                   -> " pear pear."
  spell     "Spell pear."                       -> " p-e-a-r."
  ask       "Ask me about pear."                -> " Do you like pear?"
  whisper   "Whisper the word pear."            -> " pear..."
  sound     "What sound does the cow make?"     -> " A cow says moo."
  color     "What color is snow?"               -> " Snow is white in color."
  opposite  "What is the opposite of hot?"      -> " The opposite of hot is cold."
  category  "Name a fruit."                     -> " Mango is a fruit."   (any member is right)

The chosen answer is correct. The rejected answer is just as fluent but wrong: mostly (95%) it
ignores the instruction (the word shouted when it should be spelled, the answer to another
question), otherwise (HARD_NEGATIVE_RATE) it is a hard negative: the right form with a wrong word or
fact (" A cow says woof."). The form of an answer is visible in its own text and tied to a few words
of the prompt, so a reward model of a few hundred thousand parameters learns the preference in
minutes on a CPU and it generalises to held-out prompts (every word and fact appears under several
phrasings). Stage 2 reports its accuracy on the hard negatives alone (eval_accuracy_hard).

`score_answer(prompt, answer)` grades any answer in [0, 1]: 1.0 for the correct, well-formed answer;
0.6 when the first sentence is correct but more text follows; 0.2 when the answer has the right form
with a wrong word or fact; 0.0 otherwise. It takes the raw request or the normalised
" Human: ... Assistant:" prompt.
"""
from __future__ import annotations

import functools
import random
import re

from rlhf.data.formats import Record, format_prompt

SEED = 20240607
NUM_PAIRS = 10000
HARD_NEGATIVE_RATE = 0.05
"""Share of rejected answers with the right form but wrong content (the rest ignore the task)."""
FORM_ONLY_SCORE = 0.2
"""score_answer of an answer with the right form and wrong content (a hard negative)."""

SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
    "owl": "hoot", "lion": "roar", "snake": "hiss", "horse": "neigh", "frog": "croak", "bee": "buzz",
    "mouse": "squeak", "crow": "caw",
}
COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
    "a tomato": "red", "a plum": "purple", "milk": "white", "a carrot": "orange", "chocolate": "brown",
    "a strawberry": "red", "a lemon": "yellow", "a leaf": "green", "the sea": "blue", "soot": "black",
    "a pumpkin": "orange",
}
_OPPOSITE_PAIRS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("day", "night"),
    ("wet", "dry"), ("old", "new"), ("happy", "sad"), ("light", "dark"), ("open", "closed"),
    ("early", "late"), ("full", "empty"), ("hard", "soft"), ("loud", "quiet"), ("left", "right"),
    ("in", "out"),
]
OPPOSITES = {**{a: b for a, b in _OPPOSITE_PAIRS}, **{b: a for a, b in _OPPOSITE_PAIRS}}
CATEGORIES = {
    "fruit": ["apple", "pear", "grape", "mango", "peach", "cherry"],
    "vegetable": ["carrot", "potato", "onion", "pea", "leek", "bean"],
    "metal": ["iron", "gold", "silver", "copper", "tin", "zinc"],
    "planet": ["mars", "venus", "earth", "jupiter", "saturn", "mercury"],
    "tool": ["hammer", "saw", "drill", "wrench", "chisel", "spade"],
    "drink": ["tea", "coffee", "milk", "juice", "water", "cocoa"],
    "instrument": ["piano", "violin", "drum", "flute", "guitar", "harp"],
    "tree": ["oak", "pine", "birch", "maple", "willow", "cedar"],
}
WORDS = sorted({w for ws in CATEGORIES.values() for w in ws} | set(SOUNDS))
"""Words the five word tasks act on (lower-case ASCII letters)."""


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _Task:
    """One task: request phrasings, keys, right values, the answer sentence and its form."""

    def __init__(self, questions, keys, values, answer, form):
        self.questions, self.keys, self.values, self.answer = questions, keys, values, answer
        self.form = re.compile(form)
        """Regex (with {k} filled in) an answer of the right form matches, right or wrong."""


TASKS: dict[str, _Task] = {
    "shout": _Task(["Shout the word {k}.", "Shout {k}.", "Can you shout {k}?"], WORDS,
                   lambda k: [k], lambda k, v: f"{v.upper()}!", r"^[A-Z]+!$"),
    "twice": _Task(["Say {k} twice.", "Repeat {k} twice.", "Write the word {k} twice."], WORDS,
                   lambda k: [k], lambda k, v: f"{v} {v}.", r"^([a-z]+) \1\.$"),
    "spell": _Task(["Spell {k}.", "Spell the word {k}.", "How do you spell {k}?"], WORDS,
                   lambda k: [k], lambda k, v: "-".join(v) + ".", r"^[a-z](-[a-z])+\.$"),
    "ask": _Task(["Ask me about {k}.", "Ask a question about {k}.", "Ask about the word {k}."], WORDS,
                 lambda k: [k], lambda k, v: f"Do you like {v}?", r"^Do you like [a-z]+\?$"),
    "whisper": _Task(["Whisper the word {k}.", "Whisper {k}.", "Can you whisper {k}?"], WORDS,
                     lambda k: [k], lambda k, v: f"{v}...", r"^[a-z]+\.\.\.$"),
    "sound": _Task(["What sound does the {k} make?", "What does the {k} say?", "Which noise does the {k} make?"],
                   list(SOUNDS), lambda k: [SOUNDS[k]], lambda k, v: f"{_cap(_a(k))} {k} says {v}.",
                   r"^An? {k} says [a-z]+\.$"),
    "color": _Task(["What color is {k}?", "Tell me the color of {k}.", "Which color is {k}?"],
                   list(COLORS), lambda k: [COLORS[k]], lambda k, v: f"{_cap(k)} is {v} in color.",
                   r"^{K} is [a-z]+ in color\.$"),
    "opposite": _Task(["What is the opposite of {k}?", "Give the opposite of {k}.", "Name the opposite of {k}."],
                      list(OPPOSITES), lambda k: [OPPOSITES[k]], lambda k, v: f"The opposite of {k} is {v}.",
                      r"^The opposite of {k} is [a-z]+\.$"),
    "category": _Task(["Name a {k}.", "Give me one {k}.", "Can you name a {k}?"], list(CATEGORIES),
                      lambda k: CATEGORIES[k], lambda k, v: f"{_cap(v)} is {_a(k)} {k}.", r"^[A-Z][a-z]+ is an? {k}\.$"),
}
WORD_TASKS = ["shout", "twice", "spell", "ask", "whisper"]
FACT_TASKS = ["sound", "color", "opposite", "category"]
PREFIXES = ["", "", "", "Please. ", "Quick one: ", "Hi! ", "Now. "]

# Requests parsed back into (task, key): the phrasings in regex form.
_QUESTION_RES = [
    (name, re.compile("^" + re.escape(q).replace(re.escape("{k}"), "(?P<k>.+?)") + "$"))
    for name, task in TASKS.items() for q in task.questions
]


def answer_for(task: str, key: str, value: str) -> str:
    """The answer sentence of `task` for `key` stating `value` (no leading space)."""
    return TASKS[task].answer(key, value)


def right_answers(task: str, key: str) -> list[str]:
    t = TASKS[task]
    return [t.answer(key, v) for v in t.values(key)]


def _wrong_value(task: str, key: str, rng: random.Random) -> str:
    t = TASKS[task]
    right = set(t.values(key))
    pool = sorted({v for k in t.keys for v in t.values(k)} | (set(WORDS) if task in WORD_TASKS else set()))
    return rng.choice([v for v in pool if v not in right and v != key])


def hard_negative(task: str, key: str, rng: random.Random) -> str:
    """An answer of the right form stating a wrong word / fact."""
    return TASKS[task].answer(key, _wrong_value(task, key, rng))


def is_hard_negative(prompt: str, answer: str) -> bool:
    """True when `answer` has the right form for `prompt` but the wrong content."""
    return score_answer(prompt, answer) == FORM_ONLY_SCORE


def make_pair(rng: random.Random) -> tuple[str, str, str]:
    """One (request, chosen, rejected) triple (answers without the leading space)."""
    task = rng.choice(list(TASKS))
    t = TASKS[task]
    key = rng.choice(t.keys)
    request = rng.choice(PREFIXES) + rng.choice(t.questions).format(k=key)
    chosen = t.answer(key, rng.choice(t.values(key)))
    if rng.random() < HARD_NEGATIVE_RATE:
        rejected = hard_negative(task, key, rng)  # right form, wrong content
    elif task in WORD_TASKS:
        rejected = answer_for(rng.choice([w for w in WORD_TASKS if w != task]), key, key)  # ignores the task
    else:
        other = rng.choice([f for f in FACT_TASKS if f != task])  # answers another question
        okey = rng.choice(TASKS[other].keys)
        rejected = rng.choice(right_answers(other, okey))
    return request, chosen, rejected


def records(num_pairs: int = NUM_PAIRS, seed: int = SEED) -> list[Record]:
    """The built-in prompt/chosen/rejected pairs, identical on every call."""
    return list(_records(num_pairs, seed))


@functools.lru_cache(maxsize=4)
def _records(num_pairs: int, seed: int) -> tuple[Record, ...]:
    rng = random.Random(seed)
    out = []
    for _ in range(num_pairs):
        q, c, r = make_pair(rng)
        out.append(Record(prompt=format_prompt(q), chosen=" " + c, rejected=" " + r))
    return tuple(out)


def pretrain_texts(num_docs: int = 2000, seed: int = SEED + 1) -> list[str]:
    """Plain text of the same small world (for the pretraining-loss mix of stage 3)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            task = rng.choice(FACT_TASKS)
            key = rng.choice(TASKS[task].keys)
            sentences.append(rng.choice(right_answers(task, key)))
        docs.append(" ".join(sentences))
    return docs


def parse_question(prompt: str) -> tuple[str, str] | None:
    """(task, key) of a built-in request, raw or in " Human: ... Assistant:" form; None if foreign."""
    text = prompt.strip()
    if text.startswith("Human:"):
        text = text[len("Human:"):]
    if text.endswith("Assistant:"):
        text = text[: -len("Assistant:")]
    text = text.strip()
    for prefix in sorted({p.strip() for p in PREFIXES if p}, key=len, reverse=True):
        if text.startswith(prefix + " "):
            text = text[len(prefix):].strip()
            break
    for task, pattern in _QUESTION_RES:
        m = pattern.match(text)
        if m and m.group("k") in TASKS[task].keys:
            return task, m.group("k")
    return None


_FIRST_SENTENCE = re.compile(r"^(.*?(?:\.\.\.|[.!?]))(?:\s|$)", re.S)


def score_answer(prompt: str, answer: str) -> float:
    """Objective quality of `answer` to a built-in `prompt`, in [0, 1] (see module docstring)."""
    parsed = parse_question(prompt)
    if parsed is None:
        raise ValueError(f"not a built-in request: {prompt!r}")
    task, key = parsed
    text = answer.strip()
    m = _FIRST_SENTENCE.match(text)
    sentence = m.group(1) if m else text
    if sentence in right_answers(task, key):
        return 1.0 if sentence == text else 0.6
    form = TASKS[task].form.pattern.replace("{k}", re.escape(key)).replace("{K}", re.escape(_cap(key)))
    return FORM_ONLY_SCORE if re.match(form, sentence) else 0.0
