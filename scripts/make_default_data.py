#!/usr/bin/env python3
"""Writes assets/default/data.jsonl: the synthetic dataset of `lorafuse train` with no arguments.

Small deterministic tasks (reverse, uppercase, add, count letters, sort, repeat, next weekday) as
OpenAI-format chat lines, plus ~10% plain {"text": ...} lines, so the default run exercises both
formats. Everything is generated here from the word list below: no third-party text, so the file
carries the repository's licence. Re-running with the same seed gives the same bytes.
"""
import json
import random
from pathlib import Path

WORDS = """apple river stone cloud tiger green house light music paper water window garden
silver orange planet forest bridge candle dragon engine flower guitar hammer island jacket
kitten lemon market needle ocean pencil rabbit saddle ticket violin wagon yellow zebra anchor
basket castle desert feather ginger harbor insect jungle kettle ladder mirror nickel pepper
quartz rocket spider tunnel valley walnut button cactus donkey eagle falcon goose honey igloo
jelly koala lizard mango nectar otter parrot quilt raven salmon turtle umbrella velvet walrus
bread chair clock crown dream field glass heart knife lunch money night plant queen sheep
smile snake sugar table train truck voice whale world youth""".split()
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def task(rng):
    k = rng.randrange(7)
    w = rng.choice(WORDS)
    if k == 0:
        return f"Reverse the word: {w}", w[::-1]
    if k == 1:
        ws = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
        return f"Uppercase: {ws}", ws.upper()
    if k == 2:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}"
    if k == 3:
        return f"Count the letters in '{w}'.", f"'{w}' has {len(w)} letters."
    if k == 4:
        ws = rng.sample(WORDS, rng.randint(2, 4))
        return f"Sort these words: {', '.join(ws)}", ", ".join(sorted(ws))
    if k == 5:
        return f"Repeat twice: {w}", f"{w} {w}"
    d = rng.randrange(7)
    return f"What day comes after {DAYS[d]}?", DAYS[(d + 1) % 7]


def text_line(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    w = rng.choice(WORDS)
    return rng.choice([
        f"{a} times {b} is {a * b}.",
        f"The word {w} is spelled {'-'.join(w)}.",
        f"The days of the week are {', '.join(DAYS)}.",
        f"A {w} is not a {rng.choice(WORDS)}.",
    ])


def main():
    rng = random.Random(1234)
    out = Path(__file__).resolve().parent.parent / "assets/default/data.jsonl"
    lines = []
    while sum(len(l) + 1 for l in lines) < 260_000:
        if rng.random() < 0.1:
            lines.append(json.dumps({"text": text_line(rng)}))
        else:
            q, a = task(rng)
            lines.append(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
    out.write_text("\n".join(lines) + "\n")
    print(f"{out}: {len(lines)} lines, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
