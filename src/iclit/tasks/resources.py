"""Tasks read at run time from public lexical resources installed by Debian packages.

Nothing of these resources is copied into iclit: the readers parse the installed files.

* **WordNet 3.0** (``wordnet-base``; ``/usr/share/wordnet``, or ``$ICLIT_WORDNET_DIR``):
  :func:`antonym_pairs` reads the antonym pointers (``!``) of ``data.adj`` and the sense
  tag counts of ``index.adj`` (file formats: wndb(5WN)).
* **FreeDict English–Czech** (``dict-freedict-eng-ces``; ``/usr/share/dictd``, or
  ``$ICLIT_FREEDICT_DIR``): :func:`word_translations` reads the dictd database
  (``freedict-eng-ces.index`` + the dictzip'd, gzip-compatible ``freedict-eng-ces.dict.dz``)
  and keeps the English words with one single-word Czech translation; WordNet's index files
  give the frequency filter.

The filters (what makes exact-match scoring fair) are documented with each function and in
``iclit/tasks/data/README.md``. A missing package is one :class:`MissingResourceError`
naming it.
"""

from __future__ import annotations

import gzip
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .base import Example
from .loaders import TaskDataError

__all__ = [
    "MissingResourceError",
    "WORDNET_PACKAGE",
    "FREEDICT_PACKAGE",
    "wordnet_dir",
    "freedict_dir",
    "AntonymPair",
    "antonym_pairs",
    "antonym_examples",
    "read_dictd",
    "word_translations",
    "translation_examples",
    "wordnet_tag_counts",
]

WORDNET_PACKAGE = "wordnet-base"
FREEDICT_PACKAGE = "dict-freedict-eng-ces"
FREEDICT_NAME = "freedict-eng-ces"

_ENGLISH_WORD = re.compile(r"[a-z]{2,12}")
"""A plain English word: lowercase ASCII letters only (no capitals, digits, hyphens,
apostrophes, underscores = multi-word lemmas), 2 to 12 letters."""
_CZECH_WORD = re.compile(r"[^\W\d_]+")
"""One word of letters (any script, so Czech diacritics), no spaces, digits or punctuation."""
_MARKER = re.compile(r"\([a-z]+\)$")
"""The syntactic marker of an adjective in data.adj (``(a)``, ``(p)``, ``(ip)``)."""
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


class MissingResourceError(TaskDataError):
    """A task's Debian package is not installed (``package``; ``install``: the command)."""

    def __init__(self, task: str, package: str, missing: Path) -> None:
        self.task, self.package, self.path = task, package, missing
        self.install = f"apt-get install {package}"
        super().__init__(f"task {task!r} needs the Debian package {package} ({self.install}); {missing} not found")


def wordnet_dir() -> Path:
    """Where WordNet's database files are: ``$ICLIT_WORDNET_DIR`` or ``/usr/share/wordnet``."""
    return Path(os.environ.get("ICLIT_WORDNET_DIR") or "/usr/share/wordnet")


def freedict_dir() -> Path:
    """Where the dictd databases are: ``$ICLIT_FREEDICT_DIR`` or ``/usr/share/dictd``."""
    return Path(os.environ.get("ICLIT_FREEDICT_DIR") or "/usr/share/dictd")


def _need(task: str, package: str, path: Path) -> Path:
    if not path.is_file():
        raise MissingResourceError(task, package, path)
    return path


def _records(path: Path):
    """The non-header lines of a WordNet index/data file (the licence lines start with two spaces)."""
    with path.open(encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, start=1):
            if line.startswith("  ") or not line.strip():
                continue
            yield lineno, line


def wordnet_tag_counts(directory: Path, pos: str = "adj", *, task: str = "antonyms") -> dict[str, int]:
    """``lemma → tagsense_cnt`` of ``index.{pos}``: how many of the lemma's senses are tagged in
    WordNet's semantic concordances (SemCor), the frequency signal WordNet itself orders senses by.

    index.pos line: ``lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt offsets...``
    """
    path = _need(task, WORDNET_PACKAGE, Path(directory) / f"index.{pos}")
    counts: dict[str, int] = {}
    for lineno, line in _records(path):
        f = line.split()
        try:
            p_cnt = int(f[3])
            counts[f[0]] = int(f[5 + p_cnt])
        except (IndexError, ValueError):
            raise TaskDataError(f"{path} line {lineno}: not a WordNet index line: {line[:80]!r}") from None
    return counts


def _adjective_antonyms(path: Path) -> dict[str, set[str]]:
    """Every adjective word form (as written: case kept, so proper nouns stay capitalised) → the
    set of its antonyms over all its senses.

    data.adj line: ``offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt [ptr...] | gloss``
    with ``ptr = symbol offset pos source/target``; an antonym is the lexical pointer ``!``
    from word number ``source`` of this synset to word number ``target`` of the other one.
    """
    synsets: dict[str, tuple[list[str], list[tuple[int, str, int]]]] = {}
    for lineno, line in _records(path):
        f = line.split(" | ", 1)[0].split()
        try:
            n_words = int(f[3], 16)
            words = [_MARKER.sub("", f[4 + 2 * i]) for i in range(n_words)]
            i = 4 + 2 * n_words
            n_ptrs = int(f[i])
            ptrs = []
            for j in range(n_ptrs):
                symbol, target, _pos, st = f[i + 1 + 4 * j : i + 5 + 4 * j]
                if symbol == "!":
                    ptrs.append((int(st[:2], 16), target, int(st[2:], 16)))
        except (IndexError, ValueError):
            raise TaskDataError(f"{path} line {lineno}: not a WordNet data line: {line[:80]!r}") from None
        synsets[f[0]] = (words, ptrs)
    antonyms: dict[str, set[str]] = defaultdict(set)
    for words, ptrs in synsets.values():
        for source, target, word in ptrs:
            if target not in synsets or not (1 <= source <= len(words)) or not (1 <= word <= len(synsets[target][0])):
                raise TaskDataError(f"{path}: antonym pointer to {target}/{word} that the file does not have")
            antonyms[words[source - 1]].add(synsets[target][0][word - 1])
    return antonyms


@dataclass(frozen=True)
class AntonymPair:
    word: str
    antonym: str
    tags: tuple[int, int]  # SemCor tag counts of word and antonym (index.adj)


def antonym_pairs(directory: Path | None = None, *, task: str = "antonyms") -> list[AntonymPair]:
    """Unambiguous adjective antonym pairs of WordNet, sorted by word.

    Kept: the pairs {a, b} of adjectives where

    1. a's antonyms over *all* its senses in data.adj are exactly {b}, and b's exactly {a}
       (one-to-one: no word with several different antonyms, e.g. *old* → young / new);
    2. both are plain words: ``[a-z]{2,12}`` (no multi-word lemmas, hyphens, capitals/proper
       nouns, digits, longer than 12 letters);
    3. both are not rare: at least one sense of each is tagged in SemCor (tagsense_cnt ≥ 1 in
       index.adj).

    One direction per pair (so a demonstration is never the query reversed): the input is the
    more frequent word (higher tag count; ties: alphabetically first).
    """
    directory = Path(directory) if directory is not None else wordnet_dir()
    data = _need(task, WORDNET_PACKAGE, directory / "data.adj")
    tags = wordnet_tag_counts(directory, "adj", task=task)
    antonyms = _adjective_antonyms(data)
    pairs: set[tuple[str, str]] = set()
    for a, found in antonyms.items():
        if len(found) != 1:
            continue
        (b,) = found
        if antonyms.get(b) != {a} or not (_ENGLISH_WORD.fullmatch(a) and _ENGLISH_WORD.fullmatch(b)):
            continue
        ta, tb = tags.get(a, 0), tags.get(b, 0)
        if ta < 1 or tb < 1:
            continue
        pairs.add((a, b) if (-ta, a) < (-tb, b) else (b, a))
    return [AntonymPair(w, x, (tags[w], tags[x])) for w, x in sorted(pairs)]


_PREFIXES = ("un", "in", "im", "il", "ir", "non", "dis", "a", "an")


def _morphological(word: str, antonym: str) -> bool:
    """Whether one word is the other with a negating prefix (*able* / *unable*)."""
    return any(antonym == p + word or word == p + antonym for p in _PREFIXES)


def antonym_examples(directory: Path | None = None, *, task: str = "antonyms") -> list[Example]:
    """:func:`antonym_pairs` as examples ``ant-0001``… (meta: tag counts, ``morphological``)."""
    return [
        Example(
            id=f"ant-{i:04d}",
            input=p.word,
            output=p.antonym,
            meta={"tags": list(p.tags), "morphological": _morphological(p.word, p.antonym)},
        )
        for i, p in enumerate(antonym_pairs(directory, task=task), start=1)
    ]


def _b64(text: str) -> int:
    n = 0
    for c in text:
        n = n * 64 + _B64[c]
    return n


def read_dictd(
    directory: Path | None = None,
    name: str = FREEDICT_NAME,
    *,
    task: str = "translation-en-cs-words",
    package: str = FREEDICT_PACKAGE,
) -> dict[str, list[str]]:
    """A dictd database: index key → the text of each of its entries, in index order.

    ``{name}.index`` lines are ``headword TAB offset TAB length`` (dictd's base64 numbers,
    byte positions in the uncompressed ``{name}.dict.dz``, which is gzip-compatible).
    """
    directory = Path(directory) if directory is not None else freedict_dir()
    index = _need(task, package, directory / f"{name}.index")
    dz = _need(task, package, directory / f"{name}.dict.dz")
    try:
        with gzip.open(dz) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise TaskDataError(f"{dz}: not a readable dictzip/gzip file ({e})") from None
    entries: dict[str, list[str]] = defaultdict(list)
    with index.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.rstrip("\n").split("\t")
            try:
                key, start, length = fields[0], _b64(fields[1]), _b64(fields[2])
            except (IndexError, KeyError):
                raise TaskDataError(f"{index} line {lineno}: not a dictd index line: {line[:80]!r}") from None
            if key.startswith("00database") or key.startswith("00-database"):
                continue
            if start + length > len(data):
                raise TaskDataError(f"{index} line {lineno}: entry {key!r} lies beyond the end of {dz}")
            entries[key].append(data[start : start + length].decode("utf-8"))
    return dict(entries)


def _entry(text: str) -> tuple[str, list[str]]:
    """(headword, translation lines) of one FreeDict entry: ``headword [<pos>]`` then one
    translation a line (``Note:`` lines are notes)."""
    lines = text.split("\n")
    head = re.sub(r"\s*<[^>]*>\s*$", "", lines[0]).strip()
    return head, [t.strip() for t in lines[1:] if t.strip() and not t.strip().startswith("Note:")]


def word_translations(
    freedict: Path | None = None, wordnet: Path | None = None, *, task: str = "translation-en-cs-words"
) -> list[tuple[str, str, int]]:
    """``(english, czech, tag count)`` of the unambiguous single-word entries, sorted by word.

    Kept: the English headwords where

    1. every entry under the headword is written exactly so (lowercase; no capitalised
       homograph such as *Sun*), and the word is ``[a-z]{3,12}`` (no multi-word headwords,
       hyphens, digits, capitals, more than 12 letters);
    2. all its entries together give exactly one distinct translation (entries that differ
       only in the part-of-speech tag count once), and that translation is one lowercase word
       of letters (no spaces, parentheses, domain labels such as ``[hud]``, capitals) and is
       not the English word itself (a loan spelt alike is no translation);
    3. the word is a WordNet lemma with at least one SemCor-tagged sense over the four parts
       of speech (summed tagsense_cnt ≥ 1 in index.noun/verb/adj/adv): this drops rare words
       and inflected forms (*omits*, *cabbages*), which have no lemma.
    """
    entries = read_dictd(freedict, task=task)
    wn = Path(wordnet) if wordnet is not None else wordnet_dir()
    tags: dict[str, int] = defaultdict(int)
    for pos in ("noun", "verb", "adj", "adv"):
        for lemma, n in wordnet_tag_counts(wn, pos, task=task).items():
            tags[lemma] += n
    out = []
    for key in sorted(entries):
        if not (3 <= len(key) <= 12) or not _ENGLISH_WORD.fullmatch(key) or tags.get(key, 0) < 1:
            continue
        parsed = [_entry(e) for e in entries[key]]
        if any(head != key for head, _ in parsed):
            continue
        found = {t for _, ts in parsed for t in ts}
        if len(found) != 1:
            continue
        (cs,) = found
        if not _CZECH_WORD.fullmatch(cs) or cs != cs.lower() or cs == key:
            continue
        out.append((key, cs, tags[key]))
    return out


def translation_examples(
    freedict: Path | None = None, wordnet: Path | None = None, *, task: str = "translation-en-cs-words"
) -> list[Example]:
    """:func:`word_translations` as examples ``encsw-0001``… (meta: WordNet tag count)."""
    return [
        Example(id=f"encsw-{i:04d}", input=en, output=cs, meta={"tags": n})
        for i, (en, cs, n) in enumerate(word_translations(freedict, wordnet, task=task), start=1)
    ]
