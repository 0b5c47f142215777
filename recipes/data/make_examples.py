"""Regenerates the small synthetic example sets under recipes/data (not sms_spam, which is real).

They exist so every shipped recipe runs offline on a fresh clone; they are
tiny and rule-generated, good for checking plumbing and learning curves,
not for judging model quality. Run: python recipes/data/make_examples.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
PEOPLE = ["Alice", "Bruno", "Chen", "Dara", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Jia"]
PLACES = ["Paris", "Lagos", "Kyoto", "Lima", "Oslo", "Cairo", "Quito", "Hanoi", "Perth", "Riga"]
ORGS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne"]
VERBS = ["visited", "left", "moved to", "works near", "flew to"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WORDS = "the a cat dog sun rain river stone light green quick slow bird tree small large old new red blue".split()


def write(folder: str, name: str, rows: list[dict]) -> None:
    path = HERE / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def ner(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        person, place, org = rng.choice(PEOPLE), rng.choice(PLACES), rng.choice(ORGS)
        verb = rng.choice(VERBS).split()
        tokens = [person, *verb, place, "with", org, "staff"]
        tags = ["B-PER"] + ["O"] * len(verb) + ["B-LOC", "O", "B-ORG", "O"]
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def similarity(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a = rng.sample(WORDS, 6)
        keep = rng.randint(0, 6)
        b = a[:keep] + rng.sample([w for w in WORDS if w not in a], 6 - keep)
        rng.shuffle(b)
        rows.append({"sentence1": " ".join(a), "sentence2": " ".join(b), "score": round(5.0 * keep / 6, 3)})
    return rows


def arithmetic(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        x, y = rng.randint(0, 4), rng.randint(0, 5)
        rows.append(
            {
                "prompt": f"What is {NUMBERS[x]} plus {NUMBERS[y]}?",
                "response": f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]}.",
            }
        )
    return rows


def digits(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        k = rng.choices(range(10), k=rng.randint(2, 5))
        rows.append({"source": "digits: " + " ".join(NUMBERS[i] for i in k), "target": " ".join(map(str, k))})
    return rows


if __name__ == "__main__":
    for folder, make in (("ner", ner), ("similarity", similarity), ("chat", arithmetic), ("digits", digits)):
        rng = random.Random(folder)
        write(folder, "train.jsonl", make(rng, 256))
        write(folder, "validation.jsonl", make(rng, 64))
