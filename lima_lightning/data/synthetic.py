"""A built-in instruction set with exact answers, generated in code.

The demo and the tests need data that downloads nothing and that a tiny model can visibly
learn: short prompts from a few task families, each answer a deterministic function of the
prompt. Train and predict splits draw from disjoint seeds.
"""

from __future__ import annotations

import random

from lima_lightning.data.conversations import Conversation

WORDS = (
    "apple",
    "river",
    "cloud",
    "stone",
    "green",
    "light",
    "music",
    "table",
    "tiger",
    "ocean",
    "bread",
    "chair",
    "dream",
    "flame",
    "glass",
    "horse",
    "lemon",
    "piano",
    "smile",
    "train",
)
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Chile": "Santiago",
    "Greece": "Athens",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEEDS = {"train": 0, "predict": 1}


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"What is {a} + {b}?", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Reverse the word '{word}'.", word[::-1]


def _upper(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Write '{word}' in capital letters.", word.upper()


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def _count(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"How many letters are in '{word}'?", f"'{word}' has {NUMBER_WORDS[len(word)]} letters."


TASKS = (_add, _reverse, _upper, _capital, _count)


def synthetic_conversations(split: str = "train", size: int = 512) -> list[Conversation]:
    """`size` single-turn conversations, the same for the same `split` on every machine."""
    rng = random.Random(SPLIT_SEEDS[split])
    conversations = []
    for i in range(size):
        prompt, answer = TASKS[i % len(TASKS)](rng)
        conversations.append(Conversation((prompt, answer), where=f"synthetic/{split}:{i}"))
    return conversations
