"""Four toy "skills" whose answers can be generated and checked exactly.

The demo needs fine-tuned models whose abilities are unambiguous to measure, so
that a merge's effect on each ability is a number rather than a judgement call.
Each skill is a tiny string-to-string function, prompted as ``"<prefix> <input>="``
with the answer as the completion. The prefix word is what tells a model which
skill is being asked for, so several skills can share one model (that is the
whole point of merging them).

Every generator draws only from the ``random.Random`` it is handed, so a
seeded rng gives the same examples on every machine and Python version.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping
from typing import ClassVar

Example = dict[str, str]

#: Every character a prompt or completion can contain. The tokenizer is built to
#: cover exactly this set, so nothing a skill emits can become an unknown token.
ALPHABET = string.ascii_lowercase + string.digits + "+= "


def exact_match(prediction: str, completion: str) -> bool:
    """Whether a prediction equals the reference, ignoring surrounding whitespace.

    Generation may leave a trailing space or newline before the end-of-sequence
    token; that is not a wrong answer, anything else is.
    """
    return prediction.strip() == completion.strip()


def _random_word(rng: random.Random, min_len: int, max_len: int) -> str:
    length = rng.randint(min_len, max_len)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


class Skill:
    """A named task: example generator plus exact scorer.

    Subclasses set ``name`` and ``prefix`` and implement ``answer``/``sample_input``;
    the prompt format lives here once so every skill is formatted alike.
    """

    name: ClassVar[str]
    prefix: ClassVar[str]

    def sample_input(self, rng: random.Random) -> str:
        raise NotImplementedError

    def answer(self, text: str) -> str:
        raise NotImplementedError

    def prompt(self, text: str) -> str:
        return f"{self.prefix} {text}="

    def example(self, text: str) -> Example:
        return {"prompt": self.prompt(text), "completion": self.answer(text)}

    def generate(self, rng: random.Random, n: int) -> list[Example]:
        """``n`` examples drawn from ``rng`` (duplicates possible; callers dedupe)."""
        return [self.example(self.sample_input(rng)) for _ in range(n)]

    def score(self, prediction: str, completion: str) -> bool:
        return exact_match(prediction, completion)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Addition(Skill):
    """``add 47+38=`` -> ``85``: two-digit operands by default.

    Digits are written most-significant first, so the first answer digit already
    depends on the carry: the hardest of the four skills for a left-to-right
    model. Three-digit operands would be harder still, but a few-million
    parameter model does not learn them within the demo's CPU budget.
    """

    name = "addition"
    prefix = "add"

    def __init__(self, min_digits: int = 2, max_digits: int = 2) -> None:
        self.min_digits = min_digits
        self.max_digits = max_digits

    def _operand(self, rng: random.Random) -> int:
        # Pick the digit count first: sampling the value uniformly would make
        # 3-digit operands ten times as frequent as 2-digit ones.
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1), 10**digits - 1)

    def sample_input(self, rng: random.Random) -> str:
        a = self._operand(rng)
        b = self._operand(rng)
        return f"{a}+{b}"

    def answer(self, text: str) -> str:
        a, b = text.split("+")
        return str(int(a) + int(b))


class _WordSkill(Skill):
    """A skill whose input is one random string of ``min_len``-``max_len`` letters."""

    def __init__(self, min_len: int = 3, max_len: int = 6) -> None:
        self.min_len = min_len
        self.max_len = max_len

    def sample_input(self, rng: random.Random) -> str:
        return _random_word(rng, self.min_len, self.max_len)


class Reverse(_WordSkill):
    """``rev abcd=`` -> ``dcba``: reverse a random string of 3-6 letters."""

    name = "reverse"
    prefix = "rev"

    def answer(self, text: str) -> str:
        return text[::-1]


class Sort(_WordSkill):
    """``sort dbca=`` -> ``abcd``: the letters of a 3-6 letter string in order."""

    name = "sort"
    prefix = "sort"

    def answer(self, text: str) -> str:
        return "".join(sorted(text))


def make_lexicon(seed: int = 1234, size: int = 30) -> dict[str, str]:
    """A made-up dictionary of ``size`` pronounceable word pairs, fixed by ``seed``.

    Source and target words are all distinct from one another, so a model cannot
    get an answer right by copying the prompt.
    """
    rng = random.Random(seed)
    consonants = "bdfgklmnprstvz"
    vowels = "aeiou"
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < 2 * size:
        # consonant-vowel-consonant, sometimes with one more vowel: 3-4 letters
        word = rng.choice(consonants) + rng.choice(vowels) + rng.choice(consonants)
        if rng.random() < 0.5:
            word += rng.choice(vowels)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return dict(zip(words[:size], words[size:]))


class Lookup(Skill):
    """``map kel=`` -> ``tor``: translate 1-3 words with a fixed made-up lexicon.

    Several words per prompt keep the prompt space large (~28k prompts from a
    30-word table), so held-out evaluation prompts can be disjoint from the
    training ones while still testing the same memorised table.
    """

    name = "lookup"
    prefix = "map"

    def __init__(self, table: Mapping[str, str] | None = None, min_words: int = 1, max_words: int = 3) -> None:
        self.table: Mapping[str, str] = dict(table) if table is not None else make_lexicon()
        self._sources = sorted(self.table)
        self.min_words = min_words
        self.max_words = max_words

    def sample_input(self, rng: random.Random) -> str:
        count = rng.randint(self.min_words, self.max_words)
        return " ".join(rng.choice(self._sources) for _ in range(count))

    def answer(self, text: str) -> str:
        return " ".join(self.table[word] for word in text.split(" "))


# ------------------------------------------------------------------ the lora scenario's skills
# Its base is pretrained on six operations, each under its own prompt word: the four above and two
# more word operations (``Copy``, ``Descending``). Each adapter then teaches one *new prompt word* for
# an operation on words the base already does well (``Flip``, ``Order``, ``Echo``, ``Down``): the base
# lacks the skill only by its trigger (it guesses among the operations it knows, rarely right), so
# the update needed is small, local to that word, and distinct per skill: the regime MetaGPT assumes.


class Descending(_WordSkill):
    """``dsc dbca=`` -> ``dcba``: the letters in reverse alphabetical order."""

    name = "descending"
    prefix = "dsc"

    def answer(self, text: str) -> str:
        return "".join(sorted(text, reverse=True))


class Copy(_WordSkill):
    """``cpy abcd=`` -> ``abcd``: the word as it is."""

    name = "copy"
    prefix = "cpy"

    def answer(self, text: str) -> str:
        return text


class Flip(Reverse):
    """``flip abcd=`` -> ``dcba``: reversal under a new prompt word (the base knows ``rev``)."""

    name = "flip"
    prefix = "flip"


class Order(Sort):
    """``ord dbca=`` -> ``abcd``: sorting under a new prompt word (the base knows ``sort``)."""

    name = "order"
    prefix = "ord"


class Echo(Copy):
    """``echo abcd=`` -> ``abcd``: copying under a new prompt word (the base knows ``cpy``)."""

    name = "echo"
    prefix = "echo"


class Down(Descending):
    """``down dbca=`` -> ``dcba``: sorting downwards under a new prompt word (the base knows ``dsc``)."""

    name = "down"
    prefix = "down"


#: Names in a fixed order: builds iterate over this, so order affects rng streams.
SKILL_NAMES: tuple[str, ...] = ("addition", "reverse", "sort", "lookup")
#: What the ``lora`` scenario's base is pretrained on: ``SKILL_NAMES`` and two more word operations.
LORA_BASE_SKILL_NAMES: tuple[str, ...] = SKILL_NAMES + ("copy", "descending")
#: The skills the ``lora`` scenario's adapters teach: a new prompt word each, for a word operation
#: of ``LORA_BASE_SKILL_NAMES`` (reverse, sort, copy, descending, in that order).
ADAPTER_SKILL_NAMES: tuple[str, ...] = ("flip", "order", "echo", "down")

_SKILL_TYPES: dict[str, type[Skill]] = {
    cls.name: cls for cls in (Addition, Reverse, Sort, Lookup, Descending, Copy, Flip, Order, Echo, Down)}


def get_skill(name: str) -> Skill:
    """A fresh skill instance by name (raises ``KeyError`` listing valid names)."""
    try:
        return _SKILL_TYPES[name]()
    except KeyError:
        raise KeyError(f"unknown skill {name!r}; expected one of {LORA_BASE_SKILL_NAMES + ADAPTER_SKILL_NAMES}") from None


def all_skills(names: tuple[str, ...] = SKILL_NAMES) -> dict[str, Skill]:
    """The named skills (by default the four of the ``skills`` scenario), keyed by name, in order."""
    return {name: get_skill(name) for name in names}
