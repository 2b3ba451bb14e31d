"""The lab model's chat tasks: what it can do, what it cannot do yet, and one style to prefer.

Three kinds of task, each a `Task` that draws (prompt, answer) pairs:

- "skill": base skills that are in the pretraining corpus, so the lab model
  does them well (copy a list, first/last word, count words, recall a fact);
- "heldout": tasks that are NOT in the pretraining corpus (reverse, sort
  digits, add, translate into a code language). The base model fails them;
  the fine-tuning notebooks teach them. Inputs are built so that copying the
  input never scores (3 distinct words to reverse, digits never already
  sorted, ...);
- "style": sentence answers about the world where a polite closing
  (`STYLE_MARKER`) follows the answer in a fraction `STYLE_RATE` of the
  pretraining examples: the axis that preference tuning (DPO) moves, scored
  by `style_score`.
"""

import random
from dataclasses import dataclass
from typing import Callable

from course_utils.lab.world import DIGITS, LIST_WORDS, PEOPLE, PETS, COLORS

# ---------------------------------------------------------------- base skills


def _word_list(rng: random.Random, low: int, high: int) -> list[str]:
    """low to high distinct list items: words, or (one time in four) digits."""
    pool = DIGITS if rng.random() < 0.25 else LIST_WORDS
    return rng.sample(pool, rng.randint(low, high))


def copy_list(rng):
    items = _word_list(rng, 3, 6)
    return f"Repeat: {' '.join(items)}", " ".join(items)


def first_word(rng):
    items = _word_list(rng, 3, 6)
    return f"First word: {' '.join(items)}", items[0]


def last_word(rng):
    items = _word_list(rng, 3, 6)
    return f"Last word: {' '.join(items)}", items[-1]


def count_words(rng):
    items = _word_list(rng, 2, 8)
    return f"Count: {' '.join(items)}", str(len(items))


FACT_QUESTIONS = {
    "city": "Where does {} live?",
    "pet": "What pet does {} have?",
    "color": "What color does {} like?",
    "food": "What does {} eat?",
}


def every_fact_question():
    return [(question.format(p.name), getattr(p, attribute))
            for p in PEOPLE for attribute, question in FACT_QUESTIONS.items()]


# ---------------------------------------------------------------- held-out tasks


def reverse_words(rng):
    # Three words: longer lists need a new attention circuit that takes the lab
    # model hundreds of steps to learn, too slow for the notebooks.
    items = rng.sample(LIST_WORDS, 3)
    return f"Reverse: {' '.join(items)}", " ".join(reversed(items))


def sort_digits(rng):
    digits = rng.sample(DIGITS, rng.randint(4, 5))
    while digits == sorted(digits):  # an already sorted input could be copied
        rng.shuffle(digits)
    return f"Sort: {' '.join(digits)}", " ".join(sorted(digits))


def every_sum():
    """Single-digit sums. No 0 ("a + 0" would be answered by copying a)."""
    return [(f"Add: {a} + {b}", str(a + b)) for a in range(1, 10) for b in range(1, 10) if a + b <= 9]


# A code language: a fixed mapping of 12 words onto other words. The code words
# are words the model can already write (one token each), so what a fine-tuned
# model learns is only the mapping; none is a source word, so copying never scores.
CODE_WORDS = dict(zip(
    PETS + COLORS[:4],
    ("lake", "soup", "old", "hill", "rice", "fast", "road", "cake",
     "bread", "quiet", "park", "young"),
))


def translate_words(rng):
    words = rng.sample(list(CODE_WORDS), 3)
    return f"Translate: {' '.join(words)}", " ".join(CODE_WORDS[w] for w in words)


# ---------------------------------------------------------------- the style axis

STYLE_MARKER = "Have a nice day!"
STYLE_RATE = 0.4  # share of the corpus's "style" answers that end with the marker

DESCRIBE_PROMPTS = {
    "city": ("Tell me about {}'s home.", "{} lives in {}."),
    "pet": ("Tell me about {}'s pet.", "{} has a {}."),
    "color": ("Tell me about {}'s color.", "{} likes {}."),
    "food": ("Tell me about {}'s food.", "{} eats {}."),
}


def every_description(people=PEOPLE):
    """Sentence answers about each person, without the marker (the corpus adds it to some)."""
    return [(prompt.format(p.name), answer.format(p.name, getattr(p, attribute)))
            for p in people for attribute, (prompt, answer) in DESCRIBE_PROMPTS.items()]


def with_style(answer: str) -> str:
    return f"{answer} {STYLE_MARKER}"


def style_score(response: str) -> int:
    """1 if the response ends with the polite closing, else 0."""
    return int(response.strip().endswith(STYLE_MARKER))


def strip_style(response: str) -> str:
    """The response without the polite closing (to check its content)."""
    response = response.strip()
    return response[: -len(STYLE_MARKER)].rstrip() if style_score(response) else response


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Task:
    """A chat task. Either `make` draws one (prompt, answer) from an endless space,
    or `every` lists all of a small space (its test set is then the whole space,
    and training draws from the same prompts)."""

    name: str
    kind: str  # "skill", "heldout" or "style"
    description: str
    make: Callable[[random.Random], tuple[str, str]] | None = None
    every: Callable[[], list[tuple[str, str]]] | None = None

    @property
    def finite(self) -> bool:
        return self.every is not None

    def draw(self, rng: random.Random) -> tuple[str, str]:
        return rng.choice(self.every()) if self.finite else self.make(rng)


TASKS = {t.name: t for t in (
    Task("copy", "skill", "repeat a list of 3-6 words or digits", make=copy_list),
    Task("first_word", "skill", "the first item of a list of 3-6", make=first_word),
    Task("last_word", "skill", "the last item of a list of 3-6", make=last_word),
    Task("count", "skill", "how many items (2-8) a list has", make=count_words),
    Task("fact", "skill", "recall one of the world's 64 facts", every=every_fact_question),
    Task("reverse", "heldout", "reverse a list of 3 distinct words", make=reverse_words),
    Task("sort_digits", "heldout", "sort 4-5 distinct digits (never already sorted)", make=sort_digits),
    Task("add", "heldout", "add two digits 1-8 whose sum is at most 9 (all 36 sums)", every=every_sum),
    Task("translate", "heldout", "translate 3 of 12 words into a code language (a fixed word mapping)",
         make=translate_words),
    Task("describe", "style", "a sentence about one fact of a person", every=every_description),
)}


def tasks_of_kind(kind: str) -> list[str]:
    return [name for name, task in TASKS.items() if task.kind == kind]


def chat(prompt: str, answer: str) -> list[dict]:
    """One exchange in the messages format that chat templates and TRL take."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
