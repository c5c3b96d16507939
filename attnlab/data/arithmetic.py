"""Offline math data: a seeded generator of multi-step word problems with worked solutions.

Why it looks like this: the first generator had five templates, and 48 steps of LoRA learned the
templates, not arithmetic; its gains reversed on real grade-school math. This one is built so
that memorising it is hard and measuring transfer is possible:

- **Families** (`FAMILIES`, 30): a scenario each (a fruit stand, a water tank, a charity raffle,
  ...) with its own items, units, verbs, containers and places, so the same operation reads
  differently in every family; every operation has several sentence frames, and names, numbers
  and optional distractor sentences (numbers that do not matter) vary independently.
- **A fixed train / transfer split of the families** (`TRAIN_FAMILIES`, 20; `TRANSFER_FAMILIES`,
  10). `families="train"` never generates a transfer family, so a report can score a method on
  scenarios it was never trained on: same skills, new wording.
- **Levels** (`level`, 1..5): the number of arithmetic operations in the solution. A level-1
  problem is one small addition or subtraction with no distractor; higher levels chain additions, subtractions,
  groups (k groups of m: a product then a sum), scaling and equal sharing.

Each solution states one operation per line, `a op b = c`, and ends with `#### N` (the GSM8K
convention), so the same answer extraction serves both. Answers are non-negative integers. The
same (seed, level, families) always gives the same stream; `Record.source` is
`arithmetic/<family>`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from ..errors import ConfigError
from .records import Record

LEVELS = (1, 2, 3, 4, 5)

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Ximena", "Yusuf",
         "Zoe", "Aarav", "Bea", "Carlos", "Dmitri", "Esi", "Farid", "Greta", "Hiro", "Ines", "Jamal", "Kira",
         "Luis", "Mei", "Nadia", "Olu", "Pavel", "Rania", "Sofia", "Tomas", "Yara"]

DISTRACTORS = ["{other} is {n} years old.", "The shop opened {n} years ago.", "It was {n} degrees outside that day.",
               "{other} lives {n} miles away.", "The radio played {n} songs that morning.",
               "{other} has {n} cousins.", "The street has {n} houses.", "It took {n} minutes to get there."]


@dataclass(frozen=True)
class Family:
    """One scenario. The running quantity is `item`; verbs and places give each operation its
    wording. `gain` / `lose` are verb phrases used as '{name} <verb> {k} {item}'."""

    name: str
    items: tuple
    gain: tuple
    lose: tuple
    container: str
    place: str
    scale_reason: str = "by the end of the month"


def F(name, items, gain, lose, container, place, scale_reason="by the end of the month") -> Family:
    return Family(name, tuple(items), tuple(gain), tuple(lose), container, place, scale_reason)


_FAMILY_LIST = [
    # --- train families ---
    F("fruit_stand", ["apples", "pears", "oranges", "plums"], ["picks", "buys"], ["sells", "gives away"],
      "crate", "fruit stand"),
    F("bakery", ["muffins", "cookies", "bagels", "rolls"], ["bakes", "makes"], ["sells", "packs up"],
      "tray", "bakery", "after a busy weekend"),
    F("library", ["books", "magazines", "comics"], ["receives", "buys"], ["lends out", "donates"],
      "shelf", "library"),
    F("marbles", ["marbles", "glass beads"], ["wins", "finds"], ["loses", "trades away"], "pouch", "toy box"),
    F("savings", ["dollars"], ["earns", "saves"], ["spends", "pays out"], "envelope", "savings jar",
      "after a year of interest"),
    F("garden", ["tulips", "roses", "daisies"], ["plants", "grows"], ["cuts", "gives away"],
      "bed", "garden", "by the end of spring"),
    F("classroom", ["pencils", "erasers", "markers"], ["orders", "collects"], ["hands out", "loses"],
      "pack", "classroom"),
    F("farm_eggs", ["eggs"], ["collects", "gathers"], ["sells", "bakes with"], "carton", "farm"),
    F("parking", ["cars", "vans"], ["lets in", "counts"], ["waves out", "sends off"], "row",
      "parking lot", "by the evening rush"),
    F("stickers", ["stickers", "stamps"], ["gets", "buys"], ["gives away", "uses up"], "sheet", "album"),
    F("bus", ["passengers", "riders"], ["picks up", "takes on"], ["drops off", "lets off"], "group", "bus",
      "at the busiest stop"),
    F("fishing", ["fish", "trout"], ["catches", "reels in"], ["releases", "gives away"], "bucket", "cooler"),
    F("toy_factory", ["toy cars", "dolls", "yo-yos"], ["builds", "assembles"], ["ships", "rejects"], "box",
      "factory", "after a new machine arrives"),
    F("water_tank", ["liters of water"], ["pumps in", "adds"], ["drains", "uses"], "bucket", "tank",
      "after the rainy season"),
    F("bookstore", ["dollars"], ["takes in", "earns"], ["pays out", "spends"], "register",
      "bookstore", "during the holiday sale"),
    F("orchard", ["trees", "saplings"], ["plants", "adds"], ["cuts down", "moves away"], "row", "orchard",
      "after ten years"),
    F("candy", ["candies", "lollipops", "gummies"], ["buys", "receives"], ["eats", "shares"], "bag", "candy jar"),
    F("warehouse", ["boxes", "crates"], ["receives", "unloads"], ["ships out", "sends away"], "pallet",
      "warehouse", "after the holiday season"),
    F("seeds", ["seeds"], ["buys", "saves"], ["plants", "gives away"], "packet", "seed tin"),
    F("shells", ["shells", "pebbles"], ["finds", "collects"], ["gives away", "drops"], "jar", "collection"),
    # --- transfer families: never generated for training ---
    F("road_trip", ["miles"], ["drives", "covers"], ["backtracks", "turns back"], "leg", "trip",
      "over the whole holiday"),
    F("recipe", ["cups of flour"], ["adds", "measures out"], ["sets aside", "spills"], "bowl", "mixing bowl",
      "for a bigger party"),
    F("concert", ["tickets"], ["sells", "prints"], ["refunds", "gives back"], "booklet", "ticket office",
      "after the band gets famous"),
    F("coin_bank", ["coins", "quarters"], ["drops in", "adds"], ["takes out", "spends"], "roll", "piggy bank"),
    F("museum", ["visitors", "guests"], ["welcomes", "lets in"], ["guides out", "says goodbye to"], "tour group",
      "museum", "on the free-entry day"),
    F("paint", ["cans of paint"], ["orders", "buys"], ["uses", "returns"], "case", "storeroom"),
    F("cargo_train", ["containers"], ["loads", "takes on"], ["unloads", "drops off"], "car", "train",
      "for the long haul"),
    F("raffle", ["raffle tickets"], ["sells", "hands out"], ["cancels", "takes back"], "book", "raffle drum",
      "on the final day"),
    F("steps", ["steps"], ["walks", "climbs"], ["retraces", "walks back"], "flight", "hike"),
    F("yarn", ["meters of yarn"], ["buys", "spins"], ["knits with", "cuts off"], "ball", "basket",
      "after a gift from a friend"),
]

FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILY_LIST}
TRAIN_FAMILIES = tuple(f.name for f in _FAMILY_LIST[:20])
TRANSFER_FAMILIES = tuple(f.name for f in _FAMILY_LIST[20:])

_OPENERS = ["", "Then ", "After that, ", "Later, ", "Next, "]
_MULT = {2: "twice", 3: "three times", 4: "four times"}


def _plural(word: str) -> str:
    if word.endswith("f"):
        return word[:-1] + "ves"
    if word.endswith(("x", "ch", "sh", "s")):
        return word + "es"
    return word + "s"


def _sentence(opener: str, text: str) -> str:
    return opener + text if opener else text


def _problem(fam: Family, level: int, r: random.Random) -> tuple[str, list[str], int]:
    """(question, solution lines, answer) with exactly `level` operations."""
    name = r.choice(NAMES)
    item = r.choice(fam.items)
    small = level <= 2
    hi = 12 if level == 1 else 20 if small else 60
    sentences, steps = [], []
    left = level
    # the start: a given amount, or (when there is room) k containers of m
    if left >= 2 and r.random() < 0.35:
        k, m = r.randint(2, 6 if small else 9), r.randint(2, 10 if small else 15)
        x = k * m
        sentences.append(r.choice([f"{name} has {k} {_plural(fam.container)} with {m} {item} in each.",
                                   f"At the {fam.place}, {name} starts with {k} {_plural(fam.container)} of {m} {item} each."]))
        steps.append(f"{name} starts with {k} * {m} = {x} {item}.")
        left -= 1
    else:
        x = r.randint(3 if small else 10, hi)
        sentences.append(r.choice([f"{name} has {x} {item}.", f"There are {x} {item} in {name}'s {fam.place}.",
                                   f"{name}'s {fam.place} holds {x} {item}."]))
    question = r.choice([f"How many {item} does {name} have now?", f"How many {item} are there at the end?",
                         f"How many {item} are in the {fam.place} now?"])
    while left > 0:
        opener = r.choice(_OPENERS) if sentences else ""
        kinds = ["add", "sub"] + (["scale", "share"] if x <= 2000 and level > 1 else [])
        if left >= 2:
            kinds += ["add_groups", "sub_groups"]
        kind = r.choice(kinds)
        if kind == "share" and left == 1:
            divisors = [d for d in range(2, 10) if x % d == 0 and x // d >= 1]
            if divisors:
                k = r.choice(divisors)
                c = x // k
                sentences.append(_sentence(opener, f"{name} splits the {item} equally into {k} {_plural(fam.container)}."))
                steps.append(f"Each {fam.container} gets {x} / {k} = {c} {item}.")
                question = r.choice([f"How many {item} are in each {fam.container}?",
                                     f"How many {item} does one {fam.container} get?"])
                x, left = c, 0
                continue
            kind = "add"
        elif kind == "share":
            kind = "add"
        if kind == "scale":
            k = r.choice([2, 3] if x > 200 else [2, 3, 4])
            c = x * k
            reason = fam.scale_reason[0].upper() + fam.scale_reason[1:]
            sentences.append(f"{reason}, {name} has {_MULT[k]} as many {item} as before.")
            steps.append(f"{_MULT[k].capitalize()} as many is {x} * {k} = {c} {item}.")
            x, left = c, left - 1
        elif kind == "add":
            k = r.randint(1 if small else 2, 6 if level == 1 else 10 if small else 40)
            c = x + k
            sentences.append(_sentence(opener, r.choice([f"{name} {r.choice(fam.gain)} {k} more {item}.",
                                                         f"{name} {r.choice(fam.gain)} another {k} {item}."])))
            steps.append(r.choice([f"{name} now has {x} + {k} = {c} {item}.", f"{x} + {k} = {c} {item}."]))
            x, left = c, left - 1
        elif kind == "sub":
            if x < 2:
                continue
            k = r.randint(1, min(x - 1, 6 if level == 1 else 10 if small else 40))
            c = x - k
            sentences.append(_sentence(opener, r.choice([f"{name} {r.choice(fam.lose)} {k} {item}.",
                                                         f"{name} {r.choice(fam.lose)} {k} of the {item}."])))
            steps.append(r.choice([f"{x} - {k} = {c} {item} are left.", f"That leaves {x} - {k} = {c} {item}."])
                         if c != 1 else f"That leaves {x} - {k} = {c}.")
            x, left = c, left - 1
        else:  # k containers of m: a product, then a sum or a difference
            k, m = r.randint(2, 6), r.randint(2, 12)
            g = k * m
            if kind == "sub_groups" and g >= x:
                kind = "add_groups"
            c = x + g if kind == "add_groups" else x - g
            verb = r.choice(fam.gain if kind == "add_groups" else fam.lose)
            sentences.append(_sentence(opener, f"{name} {verb} {k} {_plural(fam.container)} with {m} {item} in each."))
            steps.append(f"{k} {_plural(fam.container)} of {m} is {k} * {m} = {g} {item}.")
            steps.append(f"{x} {'+' if kind == 'add_groups' else '-'} {g} = {c} {item}.")
            x, left = c, left - 2
    if level > 1 and r.random() < 0.35:  # a number that does not matter (level 1 stays a single clean step)
        d = r.choice(DISTRACTORS).format(other=r.choice([n for n in NAMES if n != name]), n=r.randint(2, 90))
        sentences.insert(r.randint(1, len(sentences)), d)
    return " ".join(sentences + [question]), steps, x


def _family_names(families) -> tuple[str, ...]:
    if families == "train":
        return TRAIN_FAMILIES
    if families == "transfer":
        return TRANSFER_FAMILIES
    if families == "all":
        return TRAIN_FAMILIES + TRANSFER_FAMILIES
    if isinstance(families, (list, tuple)) and families and all(f in FAMILIES for f in families):
        return tuple(families)
    raise ConfigError(f"data.families: {families!r} is not 'train', 'transfer', 'all' or a list of family "
                      f"names ({', '.join(FAMILIES)})")


def _levels(level) -> tuple[int, ...]:
    if level is None:
        return LEVELS
    levels = level if isinstance(level, (list, tuple)) else [level]
    if not levels or not all(isinstance(x, int) and not isinstance(x, bool) and x in LEVELS for x in levels):
        raise ConfigError(f"data.level: {level!r} is not a level in 1..5 or a list of them")
    return tuple(levels)


def check_options(level=None, families="train") -> None:
    """ConfigError now for a bad `level` or `families`, before any model is loaded."""
    _family_names(families)
    _levels(level)


def iter_problems(seed: int = 0, level=None, families="train") -> Iterator[Record]:
    """An endless, seeded stream of problems of the given families and levels (None: all five)."""
    names, levels = _family_names(families), _levels(level)
    r = random.Random(f"attnlab-arithmetic-v2-{seed}-{','.join(names)}-{','.join(map(str, levels))}")
    while True:
        fam = FAMILIES[r.choice(names)]
        lv = r.choice(levels)
        q, steps, ans = _problem(fam, lv, r)
        yield Record(prompt=q, target="\n".join(steps) + f"\n#### {ans}", answer=str(ans),
                     source=f"arithmetic/{fam.name}")


def arithmetic_problems(n: int, seed: int = 0, level=None, families="train") -> list[Record]:
    """The first `n` problems of `iter_problems(seed, level, families)`."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    it = iter_problems(seed, level, families)
    return [next(it) for _ in range(n)]
