"""Offline default math data: seeded multi-step arithmetic word problems with worked solutions.

Each solution states one step per line and ends with `#### N`, the GSM8K convention, so the
same answer extraction serves both. Deterministic: the same seed gives the same problems.
"""

from __future__ import annotations

import random

from .records import Record

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "coins", "cards", "shells", "stamps", "cookies"]


def _shop(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    start, bags, per, gone = r.randint(5, 60), r.randint(2, 9), r.randint(2, 12), r.randint(1, 20)
    bought = bags * per
    total = start + bought
    end = total - gone
    q = (f"{name} has {start} {item}. {name} buys {bags} bags with {per} {item} in each bag, "
         f"then gives away {gone} {item}. How many {item} does {name} have now?")
    s = [f"{name} buys {bags} * {per} = {bought} {item}.",
         f"After buying, {name} has {start} + {bought} = {total} {item}.",
         f"After giving away {gone}, {name} has {total} - {gone} = {end} {item}."]
    return q, s, end


def _wage(r: random.Random):
    name = r.choice(NAMES)
    rate, hours, days, spend = r.randint(8, 30), r.randint(2, 8), r.randint(2, 6), r.randint(5, 50)
    daily = rate * hours
    earned = daily * days
    left = earned - spend
    q = (f"{name} earns ${rate} per hour and works {hours} hours a day for {days} days. "
         f"{name} then spends ${spend} on lunch. How many dollars does {name} have left?")
    s = [f"Each day {name} earns {rate} * {hours} = {daily} dollars.",
         f"Over {days} days that is {daily} * {days} = {earned} dollars.",
         f"After lunch, {name} has {earned} - {spend} = {left} dollars."]
    return q, s, left


def _share(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    friends, each, extra, boxes = r.randint(2, 8), r.randint(2, 12), r.randint(0, 15), r.randint(2, 5)
    total = friends * each + extra
    per_box_total = total * boxes
    q = (f"{name} packs boxes of {item}. Each box holds enough for {friends} friends to get {each} "
         f"{item} each, plus {extra} spare {item}. How many {item} are in {boxes} boxes?")
    s = [f"One box gives {friends} * {each} = {friends * each} {item} to friends.",
         f"With the spares, one box holds {friends * each} + {extra} = {total} {item}.",
         f"So {boxes} boxes hold {total} * {boxes} = {per_box_total} {item}."]
    return q, s, per_box_total


def _trip(r: random.Random):
    name = r.choice(NAMES)
    speed, hours, back_speed = r.randint(20, 80), r.randint(2, 6), r.randint(2, 8) * 5
    dist = speed * hours
    back_hours = r.randint(1, 4)
    back = back_speed * back_hours
    remaining = dist - back if dist >= back else back - dist
    rel = "still away from home" if dist >= back else "past home"
    q = (f"{name} drives at {speed} miles per hour for {hours} hours, then turns around and drives "
         f"back at {back_speed} miles per hour for {back_hours} hours. How many miles is {name} {rel}?")
    op = f"{dist} - {back}" if dist >= back else f"{back} - {dist}"
    s = [f"Going out, {name} covers {speed} * {hours} = {dist} miles.",
         f"Coming back, {name} covers {back_speed} * {back_hours} = {back} miles.",
         f"The distance is {op} = {remaining} miles."]
    return q, s, remaining


def _split(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    groups, per = r.randint(2, 9), r.randint(3, 15)
    total = groups * per
    add = r.randint(1, 30)
    q = (f"{name} splits {total} {item} equally into {groups} groups, then adds {add} {item} to one "
         f"group. How many {item} are in that group now?")
    s = [f"Each group gets {total} / {groups} = {per} {item}.",
         f"After adding {add}, that group has {per} + {add} = {per + add} {item}."]
    return q, s, per + add


TEMPLATES = [_shop, _wage, _share, _trip, _split]


def arithmetic_problems(n: int, seed: int = 0) -> list[Record]:
    """`n` problems from a generator seeded by `seed`; different seeds give disjoint-looking streams."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    r = random.Random(f"attnlab-arithmetic-{seed}")
    out = []
    for _ in range(n):
        q, steps, ans = r.choice(TEMPLATES)(r)
        target = "\n".join(steps) + f"\n#### {ans}"
        out.append(Record(prompt=q, target=target, answer=str(ans), source="arithmetic"))
    return out
