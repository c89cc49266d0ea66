"""The key guard: a stored answer is never served across differing hard keys.

Similarity cannot tell "the status of order 48214" from "order 48213" (MiniLM cosine 0.98),
nor Hamlet from Macbeth in the same question frame: the embedding sees one changed token in a
familiar sentence. But the answer depends on exactly that token. So besides the similarity
threshold, two prompts must agree on their *hard keys*:

- numbers (``1,000`` = ``1000``; ordinals by their number), and a unit written right after one
  (from a list, synonyms folded: ``70%`` = ``70 percent``, ``10 km`` = ``10 kilometres``);
- codes and identifiers: tokens mixing letters with digits (``A320``, ``COVID-19``, ``v2.1``),
  ``snake_case`` / ``camelCase`` / dotted names, e-mail addresses and URLs;
- quoted strings;
- names: capitalised words inside a sentence (not its first word, which is most often an
  ordinary word such as "Divide" or "Guess"), and all-caps acronyms anywhere;
- month and weekday names, in any letter case.

Numbers must match as sets. Every other key of either prompt must occur as a word (or, for a
quoted phrase, as text) in the other one, case-insensitively — so "who wrote hamlet lol" still
matches "Who wrote Hamlet?", while "Who wrote Macbeth?" does not. This is a rule-based
approximation of entity recognition, chosen over a statistical NER model because it costs
microseconds on a CPU and needs no model download; it errs on the side of refusing a hit
(a spelled-out number or a renamed entity is a miss, never a wrong answer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:st|nd|rd|th)?(?![\w])|"
                     r"(?<![\w.])[-+]?\.\d+(?![\w])")
_NUMBER_UNIT = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(%|°[CF]?|[A-Za-zµ$€£][A-Za-z/²³]{0,11})")
# units written after a number (a fixed list: "76 multiplied by" is not a unit); synonyms map to
# one key so "70%" and "70 percent" agree
_UNITS = {u: u for u in """km m cm mm nm kg g mg µg lb lbs oz t mi ft yd l ml gal kw w kwh mw v
a mah hz khz mhz ghz mph kmh km/h kph s ms sec secs min mins h hr hrs kb mb gb tb pb kib mib gib
tib px pt dpi usd eur gbp jpy cny inr btc eth bps rpm psi bar pa kpa atm cal kcal j kj""".split()}
_UNITS.update({"%": "percent", "percent": "percent", "pct": "percent", "°": "degrees",
               "°c": "celsius", "celsius": "celsius", "°f": "fahrenheit",
               "fahrenheit": "fahrenheit", "degrees": "degrees", "$": "usd", "€": "eur",
               "£": "gbp", "dollars": "usd", "euros": "eur", "pounds": "lb", "kilometers": "km",
               "kilometres": "km", "meters": "m", "metres": "m", "miles": "mi", "mile": "mi",
               "feet": "ft", "foot": "ft", "inches": "inch", "inch": "inch", "kilograms": "kg",
               "grams": "g", "liters": "l", "litres": "l", "seconds": "s", "second": "s",
               "minutes": "min", "minute": "min", "hours": "h", "hour": "h", "days": "day",
               "day": "day", "weeks": "week", "week": "week", "months": "month",
               "month": "month", "years": "year", "year": "year", "gigabytes": "gb",
               "megabytes": "mb", "kilobytes": "kb", "bytes": "byte", "volts": "v",
               "watts": "w", "am": "am", "pm": "pm"})
_DIGITS_IN = re.compile(r"\d")
_QUOTED = re.compile(r"\"([^\"]{1,200})\"|“([^”]{1,200})”|«([^»]{1,200})»|`([^`]{1,200})`|"
                     r"(?<![\w])'([^']{2,200})'(?![\w])")
_WORD = re.compile(r"[^\W_](?:[\w.@/:+#-]*[\w#+])?", re.UNICODE)
_MONTHS_DAYS = frozenset("""january february march april may june july august september october
november december jan feb mar apr jun jul aug sep sept oct nov dec monday tuesday wednesday
thursday friday saturday sunday""".split()) - {"may", "mar", "jan"}
# capitalised at the start of a sentence without being a name (the usual openers of requests)
_OPENERS = frozenset("""what what's whats how how's why who who's whom whose where where's when
which is are was were do does did can could would should will shall may might must have has had
i i'm i've i'd you your you're we our they their he she it it's its my his her this that these
those there here please tell give show explain describe list write make find name define
compare summarize summarise translate create help let let's hi hello hey thanks thank ok okay so
and but or if in on at for from to with by of about as after before during since until while not
no yes any some all each every many much more most other another such also then now just only
even still generate provide calculate compute convert suggest recommend implement fix debug
rewrite solve add divide multiply subtract find is isn't don't doesn't can't won't should've
the a an one two three four five six seven eight nine ten hmm um well wow oh yo dear sorry
excuse quick quickly real really actually basically honestly seriously anyway btw imagine
suppose assume given consider using use tl;dr note""".split())


@dataclass(frozen=True)
class HardKeys:
    numbers: frozenset[str]
    words: frozenset[str]  # keys that must occur as a word in the other prompt
    phrases: frozenset[str]  # quoted strings that must occur as text in the other prompt
    units: frozenset[str] = frozenset()  # units after numbers, synonyms folded

    @property
    def empty(self) -> bool:
        return not (self.numbers or self.words or self.phrases or self.units)


def _norm_number(s: str) -> str:
    s = s.replace(",", "").lstrip("+")
    s = re.sub(r"(st|nd|rd|th)$", "", s)
    if "." in s:
        s = s.rstrip("0").rstrip(".") or "0"
    return s


def _norm_word(w: str) -> str:
    w = w.lower().strip(".:/-")
    return re.sub(r"['’]s$", "", w)


@lru_cache(maxsize=65_536)
def hard_keys(text: str) -> HardKeys:
    numbers = {_norm_number(m.group(0)) for m in _NUMBER.finditer(text)}
    words: set[str] = set()
    units = set()
    for m in _NUMBER_UNIT.finditer(text):
        unit = _UNITS.get(m.group(1).lower())
        if unit is not None:
            units.add(unit)
    phrases = {_norm_word(next(g for g in m.groups() if g)) for m in _QUOTED.finditer(text)}
    phrases.discard("")
    for m in _WORD.finditer(text):
        w = m.group(0)
        low = _norm_word(w)
        if not low:
            continue
        if _DIGITS_IN.search(w) and not _NUMBER.fullmatch(w):
            words.add(low)  # codes, versions, model numbers
        elif "@" in w or "://" in w or "_" in w or "." in w.strip(".") or \
                re.search(r"[a-z][A-Z]", w):
            words.add(low)  # e-mail, URL, snake_case, dotted, camelCase identifiers
        elif low in _MONTHS_DAYS:
            words.add(low)
        elif len(w) >= 2 and w.isupper() and w.isalpha():
            words.add(low)  # acronyms
        elif w[:1].isupper() and low not in _OPENERS and not _starts_sentence(text, m.start()):
            # names; a capitalised first word of a sentence is most often an ordinary word
            # ("Divide 310 by 44", "Guess what"), so only codes and acronyms count there
            words.add(low)
    return HardKeys(frozenset(numbers), frozenset(words), frozenset(phrases),
                    frozenset(units))


def _starts_sentence(text: str, at: int) -> bool:
    head = text[:at].rstrip(" \t\"'“([")
    return not head or head[-1] in ".!?:;\n"


@lru_cache(maxsize=65_536)
def _vocabulary(text: str) -> tuple[frozenset[str], str]:
    low = text.lower()
    vocab = {_norm_word(m.group(0)) for m in _WORD.finditer(text)}
    # parts of compound tokens count too ("hamlet's" → "hamlet", "covid-19" → "covid", "19")
    vocab |= {p for w in list(vocab) for p in re.split(r"[-/.]", w) if p}
    return frozenset(vocab), low


def _covered(keys: HardKeys, other: str) -> bool:
    vocab, low = _vocabulary(other)
    return all(w in vocab for w in keys.words) and all(p in low for p in keys.phrases)


def keys_agree(a: str, b: str) -> bool:
    """Whether two prompts agree on every hard key (see the module docstring)."""
    ka, kb = hard_keys(a), hard_keys(b)
    if ka.numbers != kb.numbers or ka.units != kb.units:
        return False
    return _covered(ka, b) and _covered(kb, a)


def differing_keys(a: str, b: str) -> list[str]:
    """The keys that keep ``a`` and ``b`` apart (for logs and explanations)."""
    ka, kb = hard_keys(a), hard_keys(b)
    out = sorted(ka.numbers ^ kb.numbers) + sorted(ka.units ^ kb.units)
    va, vb = _vocabulary(a)[0], _vocabulary(b)[0]
    out += sorted(w for w in ka.words if w not in vb) + sorted(w for w in kb.words if w not in va)
    return out
