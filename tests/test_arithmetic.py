import collections
import re

import pytest

from attnlab.data.arithmetic import (FAMILIES, LEVELS, TRAIN_FAMILIES, TRANSFER_FAMILIES, arithmetic_problems,
                                     iter_problems)
from attnlab.errors import ConfigError

EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def test_at_least_30_families_split_into_train_and_transfer():
    assert len(FAMILIES) >= 30
    assert set(TRAIN_FAMILIES) | set(TRANSFER_FAMILIES) == set(FAMILIES)
    assert not set(TRAIN_FAMILIES) & set(TRANSFER_FAMILIES) and len(TRANSFER_FAMILIES) >= 10


def test_no_transfer_family_is_ever_generated_for_training():
    for seed in range(3):
        for r in arithmetic_problems(1500, seed=seed):  # the default is families="train"
            assert r.source.removeprefix("arithmetic/") in TRAIN_FAMILIES
    seen = {r.source for r in arithmetic_problems(500, families="transfer")}
    assert seen == {f"arithmetic/{f}" for f in TRANSFER_FAMILIES}


def test_the_same_seed_gives_the_same_problems_and_another_seed_others():
    assert arithmetic_problems(50, seed=3, level=[2, 3]) == arithmetic_problems(50, seed=3, level=[2, 3])
    a, b = arithmetic_problems(200, seed=3), arithmetic_problems(200, seed=4)
    assert len({r.prompt for r in a} & {r.prompt for r in b}) <= 2


@pytest.mark.parametrize("families", ["train", "transfer"])
def test_level_is_the_number_of_steps_and_every_stated_equation_is_correct(families):
    for level in LEVELS:
        for r in arithmetic_problems(300, seed=level, level=level, families=families):
            eqs = EQ.findall(r.target)
            assert len(eqs) == level, r.target
            for a, op, b, c in eqs:
                assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                        "/": int(a) / int(b)}[op] == int(c), r.target
            assert eqs[-1][3] == r.answer and r.target.endswith(f"#### {r.answer}") and int(r.answer) >= 0


def test_problems_vary_in_wording_names_and_distractors():
    probs = arithmetic_problems(2000, seed=0)
    by_family = collections.defaultdict(set)
    for r in probs:
        first = r.prompt.split(".")[0]
        by_family[r.source].add(re.sub(r"\d+", "N", re.sub(r"^[A-Z][a-z]+", "X", first)))
    assert all(len(v) >= 3 for v in by_family.values()), "several phrasings of the opening per family"
    assert len({r.prompt.split()[0] for r in probs}) >= 30
    distracted = sum(any(w in r.prompt for w in ("years old", "degrees", "miles away", "songs", "cousins",
                                                 "houses", "minutes", "years ago")) for r in probs)
    assert 0.15 < distracted / len(probs) < 0.5
    # exact duplicates are rare: the hash splitter removes and counts the few there are
    assert len({r.prompt for r in probs}) >= 0.99 * len(probs)


def test_level_one_is_a_single_small_addition_or_subtraction_without_distractors():
    for r in arithmetic_problems(200, level=1):
        assert not any(w in r.prompt for w in ("years old", "degrees", "miles away", "songs", "cousins"))
        (a, op, b, c), = EQ.findall(r.target)
        assert op in "+-" and int(a) <= 12 and int(b) <= 6


def test_bad_level_or_families_is_a_clear_error():
    with pytest.raises(ConfigError, match="data.level: 7 is not a level in 1..5"):
        next(iter_problems(level=7))
    with pytest.raises(ConfigError, match="data.families: 'tranfer'"):
        next(iter_problems(families="tranfer"))
    with pytest.raises(ValueError):
        arithmetic_problems(-1)
