"""The lab model's small world: its words, its people and their facts, and how they are told.

Everything the lab model knows comes from here. The world is tiny on purpose:
16 people, each with a city, a pet, a favourite colour and a food (64 facts),
plus a scene grammar ("The old dog sleeps near the river."), number
sentences ("Mia sees 3 boats.") and counting ("Leo counts 4 5 6 7."). `general_document(rng)` writes a short text
about it: the "general" distribution used for pretraining, perplexity and
forgetting tests.

All randomness goes through a `random.Random` passed in by the caller, so the
same seed always writes the same text.
"""

import random
from dataclasses import dataclass

NAMES = ("Mia", "Tom", "Ana", "Leo", "Ivy", "Sam", "Zoe", "Max",
         "Eva", "Ben", "Lia", "Kai", "Ada", "Noa", "Eli", "Uma")
CITIES = ("Oslo", "Lima", "Rome", "Kyiv", "Pune", "Nice", "Bern", "Riga")
PETS = ("cat", "dog", "fish", "bird", "frog", "goat", "duck", "horse")
COLORS = ("red", "blue", "green", "pink", "gray", "gold", "white", "black")
FOODS = ("apples", "bread", "rice", "soup", "cake", "plums", "eggs", "beans")

# The scene grammar: "The {adjective} {noun} {verb} {preposition} the {place}."
ADJECTIVES = ("small", "big", "old", "young", "happy", "quiet", "fast", "slow")
NOUNS = ("dog", "cat", "bird", "horse", "boat", "tree", "car", "child")
VERBS = ("sits", "runs", "sleeps", "waits", "plays", "walks")
PREPOSITIONS = ("near", "by", "behind", "under", "above")
PLACES = ("river", "hill", "house", "park", "road", "garden", "market", "lake")
# Nouns whose plural is noun + "s" (for "Mia sees 3 boats.").
COUNTABLE = ("dog", "cat", "bird", "horse", "boat", "tree", "car", "duck", "goat", "frog")

# Words the list skills draw from (copy, first/last word, count, reverse ...).
LIST_WORDS = tuple(dict.fromkeys(COLORS + PETS + ADJECTIVES + PLACES + FOODS + ("boat", "tree", "car")))
DIGITS = tuple("0123456789")

WORLD_SEED = 20240601


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    pet: str
    color: str
    food: str


def _make_people() -> tuple[Person, ...]:
    """Give every person a city, pet, colour and food; each value goes to exactly two people."""
    rng = random.Random(WORLD_SEED)
    columns = []
    for values in (CITIES, PETS, COLORS, FOODS):
        column = list(values) * (len(NAMES) // len(values))
        rng.shuffle(column)
        columns.append(column)
    return tuple(Person(name, *attrs) for name, *attrs in zip(NAMES, *columns))


PEOPLE = _make_people()
PERSON = {p.name: p for p in PEOPLE}


def fact_sentences(person: Person) -> list[str]:
    """The four facts about a person, one sentence each."""
    return [
        f"{person.name} lives in {person.city}.",
        f"{person.name} has a {person.pet}.",
        f"{person.name} likes {person.color}.",
        f"{person.name} eats {person.food}.",
    ]


def scene_sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"{rng.choice(PREPOSITIONS)} the {rng.choice(PLACES)}.")


def number_sentence(rng: random.Random) -> str:
    count = rng.randint(2, 9)
    return f"{rng.choice(NAMES)} sees {count} {rng.choice(COUNTABLE)}s."


def counting_sentence(rng: random.Random) -> str:
    """Counting up ("Mia counts 3 4 5 6."): it puts the digits in order, never adds them."""
    start = rng.randint(0, 6)
    end = rng.randint(start + 2, 9)
    return f"{rng.choice(NAMES)} counts {' '.join(str(i) for i in range(start, end + 1))}."


def general_document(rng: random.Random) -> str:
    """A short text of 2-6 sentences: facts about one person mixed with scene, number and counting sentences."""
    person = rng.choice(PEOPLE)
    facts = fact_sentences(person)
    rng.shuffle(facts)
    sentences = facts[: rng.randint(1, 3)]
    for _ in range(rng.randint(1, 3)):
        other = rng.choices((scene_sentence, number_sentence, counting_sentence), (0.6, 0.2, 0.2))[0]
        sentences.insert(rng.randint(0, len(sentences)), other(rng))
    return " ".join(sentences)
