"""The built-in dataset: deterministic, varied, short, and graded objectively by score_answer."""
import random
from collections import Counter

import pytest

from rlhf.data import builtin
from rlhf.data.builtin import TASKS, parse_question, score_answer


def test_deterministic_and_sized():
    a, b = builtin.records(), builtin.records()
    assert a == b and len(a) == builtin.NUM_PAIRS >= 3000
    assert builtin.records(100, seed=1) != builtin.records(100, seed=2)


def test_variety_and_length():
    recs = builtin.records()
    tasks = Counter(parse_question(r.prompt)[0] for r in recs)
    assert set(tasks) == set(TASKS)
    assert min(tasks.values()) > 0.5 * len(recs) / len(TASKS)  # roughly balanced
    assert len({r.prompt for r in recs}) > 1000
    assert len({r.chosen for r in recs}) > 100
    assert max(len((r.prompt + r.chosen).encode()) for r in recs) < 120
    assert all(r.chosen != r.rejected for r in recs)


def test_chosen_is_right_rejected_is_wrong():
    for r in builtin.records():
        assert score_answer(r.prompt, r.chosen) == 1.0
        assert score_answer(r.prompt, r.rejected) <= 0.2


@pytest.mark.parametrize(
    "prompt,answer,score",
    [
        ("Shout the word pear.", "PEAR!", 1.0),
        ("Shout the word pear.", " PEAR! PEAR!", 0.6),
        ("Shout the word pear.", "MANGO!", 0.2),
        ("Shout the word pear.", "pear!", 0.0),
        ("Spell pear.", "p-e-a-r.", 1.0),
        ("Spell pear.", "p-e-a-r", 0.0),
        ("Whisper pear.", "pear...", 1.0),
        ("Whisper pear.", "pear... more", 0.6),
        ("Hi! What sound does the owl make?", "An owl says hoot.", 1.0),
        ("What sound does the owl make?", "An owl says moo.", 0.2),
        (" Human: Name a fruit. Assistant:", " Mango is a fruit.", 1.0),
        (" Human: Name a fruit. Assistant:", " Carrot is a fruit.", 0.2),
        (" Human: Name a fruit. Assistant:", " The sky is blue.", 0.0),
        ("What color is the sky?", "The sky is blue in color.", 1.0),
        ("What color is the sky?", "The sky is red in color.", 0.2),
        ("What color is the sky?", "The sky is blue.", 0.0),
        ("Give the opposite of hot.", "The opposite of hot is cold.", 1.0),
        ("Give the opposite of hot.", "", 0.0),
    ],
)
def test_score_answer_cases(prompt, answer, score):
    assert score_answer(prompt, answer) == score


def test_score_answer_random_text_is_low():
    rng = random.Random(0)
    prompts = [r.prompt for r in builtin.records()[:200]]
    alphabet = "abcdefgh !.-?XYZ"
    for p in prompts:
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert score_answer(p, junk) <= 0.2


def test_foreign_prompt_rejected():
    assert parse_question("What is the meaning of life?") is None
    with pytest.raises(ValueError, match="not a built-in"):
        score_answer("What is the meaning of life?", "42.")


def test_pretrain_texts_share_the_world():
    docs = builtin.pretrain_texts()
    assert docs == builtin.pretrain_texts() and len(docs) >= 1000
    sentences = [s for d in docs[:50] for s in d.replace(". ", ".\n").splitlines()]
    facts = {a for t in builtin.FACT_TASKS for k in TASKS[t].keys for a in builtin.right_answers(t, k)}
    assert all(s in facts for s in sentences)


def test_hard_negatives_share_and_score_lower():
    """HARD_NEGATIVE_RATE of the rejected answers have the right form and wrong content (a reward
    model must rank them by content); score_answer grades each strictly below its chosen answer."""
    recs = builtin.records()
    hard = [r for r in recs if builtin.is_hard_negative(r.prompt, r.rejected)]
    assert abs(len(hard) / len(recs) - builtin.HARD_NEGATIVE_RATE) < 0.03
    for r in hard:
        task, key = parse_question(r.prompt)
        assert r.rejected.strip() not in builtin.right_answers(task, key)
        assert score_answer(r.prompt, r.rejected) == builtin.FORM_ONLY_SCORE < score_answer(r.prompt, r.chosen) == 1.0
        assert not builtin.is_hard_negative(r.prompt, r.chosen)
    assert {parse_question(r.prompt)[0] for r in hard} == set(TASKS)
