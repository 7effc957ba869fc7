"""Generate examples/data/macdrop_demo.json: small instruction data whose answers are computed.

Run: python examples/make_demo_data.py  (the committed JSON is its output; seed fixed).
Every answer is derived by code, so the data is correct by construction and free of licences.
"""

import json
import random
from pathlib import Path

WORDS = [
    "river",
    "garden",
    "lantern",
    "pocket",
    "silver",
    "meadow",
    "harbor",
    "window",
    "pencil",
    "orange",
    "planet",
    "castle",
    "winter",
    "candle",
    "forest",
    "basket",
    "rocket",
    "violin",
]


def reverse_word(r):
    w = r.choice(WORDS)
    return f"Spell the word '{w}' backwards.", "", f"'{w}' spelled backwards is '{w[::-1]}'."


def add(r):
    a, b = r.randint(2, 99), r.randint(2, 99)
    return "Add the two numbers.", f"{a} and {b}", f"{a} + {b} = {a + b}."


def sort_numbers(r):
    xs = r.sample(range(1, 100), 5)
    return (
        "Sort these numbers from smallest to largest.",
        ", ".join(map(str, xs)),
        ", ".join(map(str, sorted(xs))) + ".",
    )


def count_letter(r):
    w = r.choice(WORDS)
    c = r.choice(sorted(set(w)))
    n = w.count(c)
    return (
        f"How many times does the letter '{c}' appear in '{w}'?",
        "",
        f"The letter '{c}' appears {n} time{'s' * (n != 1)} in '{w}'.",
    )


def uppercase(r):
    ws = r.sample(WORDS, 3)
    return "Rewrite the words in capital letters.", " ".join(ws), " ".join(w.upper() for w in ws)


def even_odd(r):
    n = r.randint(1, 500)
    return f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}."


TASKS = [reverse_word, add, sort_numbers, count_letter, uppercase, even_odd]


def main(n: int = 96, seed: int = 1229) -> None:
    r = random.Random(seed)
    rows = []
    for i in range(n):
        instruction, inp, output = TASKS[i % len(TASKS)](r)
        rows.append({"instruction": instruction, "input": inp, "output": output})
    out = Path(__file__).parent / "data" / "macdrop_demo.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {len(rows)} examples to {out}")


if __name__ == "__main__":
    main()
