"""Regenerates the small synthetic example sets under recipes/data (not sms_spam, which is real).

They exist so every shipped recipe runs offline on a fresh clone; they are
tiny and rule-generated, good for checking plumbing and learning curves,
not for judging model quality. Run: python recipes/data/make_examples.py

    ner, similarity, chat, digits   token tags, sentence similarity, prompt/response sums, digit spelling
    conversations                   multi-turn chats (system, user, assistant and tool turns) about sums
    preference                      prompt/chosen/rejected: the chosen answer describes with kind words,
                                    the rejected one with unkind words (the rule a preference model learns)
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


KIND = ["kind", "calm", "gentle", "friendly", "happy", "bright", "warm", "patient"]
UNKIND = ["rude", "angry", "nasty", "grumpy", "cruel", "gloomy", "bitter", "lazy"]
ANIMALS = ["cat", "dog", "bird", "horse", "fox", "bear", "goat", "owl", "wolf", "duck"]
SYSTEM = "You are a careful assistant. Answer sums in words."


def _sum(x: int, y: int) -> str:
    return f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]}."


def conversations(rng: random.Random, n: int) -> list[dict]:
    """Two or three turns of sums; some with a system prompt, some through a calculator tool."""
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        total = rng.randint(0, 3)
        x = rng.randint(0, 3)
        if rng.random() < 0.3:
            messages += [
                {"role": "user", "content": f"Use the calculator: what is {NUMBERS[total]} plus {NUMBERS[x]}?"},
                {"role": "assistant", "content": f"calculator({total} + {x})"},
                {"role": "tool", "content": str(total + x)},
                {"role": "assistant", "content": _sum(total, x)},
            ]
        else:
            messages += [
                {"role": "user", "content": f"What is {NUMBERS[total]} plus {NUMBERS[x]}?"},
                {"role": "assistant", "content": _sum(total, x)},
            ]
        total += x
        for _ in range(rng.randint(0, 1)):
            y = rng.randint(0, 9 - total)
            messages += [
                {"role": "user", "content": f"And plus {NUMBERS[y]}?"},
                {"role": "assistant", "content": _sum(total, y)},
            ]
            total += y
        rows.append({"messages": messages})
    return rows


def preference(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        animal, place = rng.choice(ANIMALS), rng.choice(PLACES)
        good, bad = rng.sample(KIND, 2), rng.sample(UNKIND, 2)
        rows.append(
            {
                "prompt": f"Describe the {animal} in {place}.",
                "chosen": f"The {animal} in {place} is {good[0]} and {good[1]}.",
                "rejected": f"The {animal} in {place} is {bad[0]} and {bad[1]}.",
            }
        )
    return rows


if __name__ == "__main__":
    sets = (
        ("ner", ner),
        ("similarity", similarity),
        ("chat", arithmetic),
        ("digits", digits),
        ("conversations", conversations),
        ("preference", preference),
    )
    for folder, make in sets:
        rng = random.Random(folder)
        write(folder, "train.jsonl", make(rng, 256))
        write(folder, "validation.jsonl", make(rng, 64))
