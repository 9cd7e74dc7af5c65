"""The built-in tasks read from installed resources (WordNet antonyms, FreeDict word
translations) and the generated ones (addition, reverse-words): the parsers on tiny fake
files in the real formats, the filters, the one error naming the Debian package, the real
installed files where present, exact-match scoring and one tiny-model run."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest

from iclit.tasks import (
    TEMPLATES,
    MissingResourceError,
    Task,
    TaskDataError,
    Template,
    builtin,
    generated,
    get_task,
    list_tasks,
    resources,
    task_table,
)

REAL_WORDNET = Path("/usr/share/wordnet/data.adj").is_file()
REAL_FREEDICT = Path("/usr/share/dictd/freedict-eng-ces.index").is_file()
NEW_TASKS = ("antonyms", "translation-en-cs-words", "addition", "reverse-words")


@pytest.fixture(autouse=True)
def fresh_registry():
    """Built tasks are cached; a test that moves a resource directory must not see (or leave) a stale one."""
    builtin._builtin.cache_clear()
    yield
    builtin._builtin.cache_clear()


# --- fake resources in the installed formats -----------------------------------------------

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by\n  2 Princeton University\n"


def write_wordnet(
    directory: Path, synsets: list[tuple[list[str], list[tuple[int, int, int]]]], tags: dict[str, int]
) -> Path:
    """data.adj (with true byte offsets) and index.adj for ``synsets``: (words, antonym
    pointers (source word, target synset number, target word)), and the other index files."""
    directory.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    offsets: list[int] = []
    pos = len(LICENCE.encode())
    for words, ptrs in synsets:  # offsets are fixed width, so two passes are not needed for the lengths
        offsets.append(pos)
        pos += len(_data_line(0, words, ptrs, [0] * len(synsets)).encode())
    for i, (words, ptrs) in enumerate(synsets):
        lines.append(_data_line(offsets[i], words, ptrs, offsets))
    (directory / "data.adj").write_text(LICENCE + "".join(lines), encoding="utf-8")
    index = []
    for lemma in sorted(tags):
        senses = [
            offsets[i] for i, (w, _) in enumerate(synsets) if lemma in [re.sub(r"\(.*\)$", "", x).lower() for x in w]
        ]
        senses = senses or [offsets[0]]
        index.append(
            f"{lemma} a {len(senses)} 1 ! {len(senses)} {tags[lemma]} " + " ".join(f"{o:08d}" for o in senses) + "  \n"
        )
    (directory / "index.adj").write_text(LICENCE + "".join(index), encoding="utf-8")
    for other in ("noun", "verb", "adv"):
        (directory / f"index.{other}").write_text(LICENCE, encoding="utf-8")
    return directory


def _data_line(offset: int, words: list[str], ptrs: list[tuple[int, int, int]], offsets: list[int]) -> str:
    body = " ".join(f"{w} 0" for w in words)
    ptr = " ".join(f"! {offsets[t]:08d} a {s:02x}{w:02x}" for s, t, w in ptrs)
    return f'{offset:08d} 00 a {len(words):02x} {body} {len(ptrs):03d} {ptr} | a gloss; "an example"  \n'


B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64(n: int) -> str:
    out = ""
    while True:
        out = B64[n % 64] + out
        n //= 64
        if not n:
            return out


def write_freedict(directory: Path, entries: list[tuple[str, str]]) -> Path:
    """A dictd database: (index key, entry text) in index order, gzip'd like dictzip."""
    directory.mkdir(parents=True, exist_ok=True)
    data = b"00-database-info\nEnglish-Czech test dictionary\n"
    index = [f"00databaseinfo\t{b64(0)}\t{b64(len(data))}\n"]
    for key, text in entries:
        raw = text.encode("utf-8")
        index.append(f"{key}\t{b64(len(data))}\t{b64(len(raw))}\n")
        data += raw
    with gzip.open(directory / "freedict-eng-ces.dict.dz", "wb") as f:
        f.write(data)
    (directory / "freedict-eng-ces.index").write_text("".join(index), encoding="utf-8")
    return directory


# synsets: 0 hot / 1 cold; 2 good / 3 bad; 4 good(2nd sense) / 5 evil; 6 well_known / 7 unknown;
# 8 Alpha / 9 omega; 10 able(a) / 11 unable; 12 obscure / 13 patent (rare: obscure untagged);
# 14 wide+broad / 15 narrow (the antonym pointer is from "wide" only)
FAKE_SYNSETS = [
    (["hot"], [(1, 1, 1)]),
    (["cold"], [(1, 0, 1)]),
    (["good"], [(1, 3, 1)]),
    (["bad"], [(1, 2, 1)]),
    (["good"], [(1, 5, 1)]),
    (["evil"], [(1, 4, 1)]),
    (["well_known"], [(1, 7, 1)]),
    (["unknown"], [(1, 6, 1)]),
    (["Alpha"], [(1, 9, 1)]),
    (["omega"], [(1, 8, 1)]),
    (["able(p)"], [(1, 11, 1)]),
    (["unable"], [(1, 10, 1)]),
    (["obscure"], [(1, 13, 1)]),
    (["patent"], [(1, 12, 1)]),
    (["wide", "broad"], [(1, 15, 1)]),
    (["narrow"], [(1, 14, 1)]),
]
FAKE_TAGS = {
    "hot": 7,
    "cold": 3,
    "good": 14,
    "bad": 9,
    "evil": 1,
    "well_known": 2,
    "unknown": 2,
    "alpha": 1,
    "omega": 1,
    "able": 3,
    "unable": 2,
    "obscure": 0,
    "patent": 1,
    "wide": 2,
    "broad": 3,
    "narrow": 4,
}


def test_antonym_parser_and_filters(tmp_path):
    wn = write_wordnet(tmp_path / "wn", FAKE_SYNSETS, FAKE_TAGS)
    pairs = resources.antonym_pairs(wn)
    # kept: hot-cold, able-unable (marker removed), wide-narrow (direction: narrow has more tags);
    # dropped: good (two antonyms), bad/evil (their antonym is ambiguous), well_known (multi-word),
    # Alpha (capital), obscure/patent (obscure untagged)
    assert [(p.word, p.antonym) for p in pairs] == [("able", "unable"), ("hot", "cold"), ("narrow", "wide")]
    assert pairs[1].tags == (7, 3)
    examples = resources.antonym_examples(wn)
    assert [e.id for e in examples] == ["ant-0001", "ant-0002", "ant-0003"]
    assert examples[0].meta == {"tags": [3, 2], "morphological": True}
    assert examples[1].meta["morphological"] is False


def test_antonyms_task_from_a_configured_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLIT_WORDNET_DIR", str(write_wordnet(tmp_path / "wn", FAKE_SYNSETS, FAKE_TAGS)))
    task = get_task("antonyms")
    assert task.kind == "generation" and task.metric == "exact" and task.score_name == "exact_match"
    assert [e.input for e in task.examples] == ["able", "hot", "narrow"]
    assert task.template == TEMPLATES["antonyms"]["default"] and task.max_new_tokens


def test_bad_wordnet_line_names_file_and_line(tmp_path):
    wn = write_wordnet(tmp_path / "wn", FAKE_SYNSETS[:2], {"hot": 1, "cold": 1})
    with (wn / "data.adj").open("a") as f:
        f.write("00009999 00 a zz broken\n")
    with pytest.raises(TaskDataError, match=r"data\.adj line 5: not a WordNet data line"):
        resources.antonym_pairs(wn)


FAKE_DICT = [
    ("apple", "apple\njablko\n"),
    ("dog", "dog <n>\npes\n"),
    ("dog", "dog <v>\npronásledovat\n"),  # two translations
    ("tree", "tree <n>\nstrom\n"),
    ("tree", "tree\nstrom\n"),  # the same one twice: kept
    ("sun", "Sun <n>\nSlunce\n"),
    ("sun", "sun <n>\nslunce\n"),  # a capitalised homograph
    ("book", "book\nkniha\n         Note: a note\n"),  # a note is no translation
    ("house", "house\n [hud] house (styl hudby)\n\n"),  # a domain label, not one word
    ("hotel", "hotel <n>\nhotel\n"),  # spelt alike
    ("run away", "run away\nutéct\n"),  # two words
    ("omits", "omits\nopomíjí\n"),  # no WordNet lemma (inflected)
    ("abbot", "abbot\nopat\n"),  # lemma, but untagged: rare
    ("big", "big\nvelký hrnec\n"),  # a two-word translation
]


def fake_wordnet_index(directory: Path, lemmas: dict[str, int]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for pos in ("noun", "verb", "adj", "adv"):
        lines = [f"{w} {pos[0]} 1 0 1 {n} 00001234  \n" for w, n in sorted(lemmas.items()) if pos == "noun"]
        (directory / f"index.{pos}").write_text(LICENCE + "".join(lines), encoding="utf-8")
    return directory


LEMMAS = {w: 1 for w in ("apple", "dog", "tree", "sun", "book", "house", "hotel", "big")} | {"abbot": 0}


def test_freedict_parser_and_filters(tmp_path):
    fd = write_freedict(tmp_path / "fd", FAKE_DICT)
    entries = resources.read_dictd(fd)
    assert entries["dog"] == ["dog <n>\npes\n", "dog <v>\npronásledovat\n"] and "00databaseinfo" not in entries
    wn = fake_wordnet_index(tmp_path / "wn", LEMMAS)
    assert resources.word_translations(fd, wn) == [("apple", "jablko", 1), ("book", "kniha", 1), ("tree", "strom", 1)]
    examples = resources.translation_examples(fd, wn)
    assert [(e.id, e.input, e.output) for e in examples][0] == ("encsw-0001", "apple", "jablko")


def test_translation_words_task_from_configured_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLIT_FREEDICT_DIR", str(write_freedict(tmp_path / "fd", FAKE_DICT)))
    monkeypatch.setenv("ICLIT_WORDNET_DIR", str(fake_wordnet_index(tmp_path / "wn", LEMMAS)))
    task = get_task("translation-en-cs-words")
    assert [e.output for e in task.examples] == ["jablko", "kniha", "strom"] and task.metric == "exact"


# --- a missing package: one error naming it; still listed -------------------------------------


def test_missing_wordnet_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLIT_WORDNET_DIR", str(tmp_path))
    expected = (
        f"task 'antonyms' needs the Debian package wordnet-base (apt-get install wordnet-base); "
        f"{tmp_path / 'data.adj'} not found"
    )
    with pytest.raises(MissingResourceError) as info:
        get_task("antonyms")
    assert str(info.value) == expected and isinstance(info.value, TaskDataError)
    assert info.value.package == "wordnet-base"


def test_missing_freedict_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLIT_FREEDICT_DIR", str(tmp_path))
    with pytest.raises(
        MissingResourceError,
        match=r"task 'translation-en-cs-words' needs the Debian package "
        r"dict-freedict-eng-ces \(apt-get install dict-freedict-eng-ces\); .*freedict-eng-ces\.index not found",
    ):
        get_task("translation-en-cs-words")
    # FreeDict there, WordNet (the frequency filter) not: the error names wordnet-base
    monkeypatch.setenv("ICLIT_FREEDICT_DIR", str(write_freedict(tmp_path / "fd", FAKE_DICT)))
    monkeypatch.setenv("ICLIT_WORDNET_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(MissingResourceError, match=r"needs the Debian package wordnet-base .*index\.noun not found"):
        get_task("translation-en-cs-words")


def test_tasks_listed_when_a_package_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLIT_WORDNET_DIR", str(tmp_path))
    monkeypatch.setenv("ICLIT_FREEDICT_DIR", str(tmp_path))
    rows = {r.name: r for r in task_table()}
    assert set(NEW_TASKS) | {"sentiment", "translation-en-cs"} <= set(rows)
    assert rows["antonyms"].examples is None and rows["antonyms"].missing == "apt-get install wordnet-base"
    assert rows["translation-en-cs-words"].missing == "apt-get install dict-freedict-eng-ces"
    assert rows["antonyms"].kind == "generation" and "wordnet-base" in rows["antonyms"].source
    assert rows["addition"].examples == 400 and rows["addition"].missing is None
    assert dict((n, c) for n, _, c, _ in list_tasks())["antonyms"] is None


def test_cli_tasks_shows_sources_and_missing_packages(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from iclit.cli import app

    wide = {"COLUMNS": "250", "NO_COLOR": "1"}
    monkeypatch.setenv("ICLIT_WORDNET_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["tasks"], env=wide)
    assert result.exit_code == 0, result.output
    assert "source" in result.output and "missing: apt-get install wordnet-base" in result.output
    for name in NEW_TASKS:
        assert name in result.output
    assert "generated (seed" in result.output and "WordNet 3.0" in result.output


# --- the real installed resources ------------------------------------------------------------


@pytest.mark.skipif(not REAL_WORDNET, reason="wordnet-base is not installed (apt-get install wordnet-base)")
def test_real_wordnet_antonyms():
    task = get_task("antonyms")
    pairs = [(e.input, e.output) for e in task.examples]
    assert len(pairs) == 293  # WordNet 3.0 (wordnet-base 1:3.0)
    assert ("hot", "cold") in pairs and ("able", "unable") in pairs
    words = [w for p in pairs for w in p]
    assert len(set(words)) == len(words)  # one-to-one, one direction per pair
    assert [p[0] for p in pairs] == sorted(p[0] for p in pairs)
    assert all(re.fullmatch(r"[a-z]{2,12}", w) for w in words)
    assert get_task("antonyms") is task  # built once


@pytest.mark.skipif(
    not (REAL_FREEDICT and REAL_WORDNET), reason="needs dict-freedict-eng-ces and wordnet-base (apt-get install …)"
)
def test_real_freedict_words():
    task = get_task("translation-en-cs-words")
    assert 1000 <= len(task) <= 6000  # 3871 with dict-freedict-eng-ces 2022.04.21 and WordNet 3.0
    found = dict((e.input, e.output) for e in task.examples)
    assert found["apple"] == "jablko" and found["airport"] == "letiště"
    assert "dog" not in found  # several translations
    assert all(" " not in cs and cs == cs.lower() for cs in found.values())
    assert list(found) == sorted(found)


# --- generated tasks -------------------------------------------------------------------------


def test_addition_is_deterministic_and_correct():
    task = get_task("addition")
    assert len(task) == 400 and task.metric == "exact"
    assert [(e.id, e.input, e.output) for e in task.examples[:2]] == [
        ("add-0001", "58 + 15", "73"),
        ("add-0002", "33 + 81", "114"),
    ]
    seen = set()
    for e in task.examples:
        a, b = map(int, e.input.split(" + "))
        assert 10 <= a <= 99 and 10 <= b <= 99 and int(e.output) == a + b
        assert frozenset((a, b)) not in seen  # not even swapped
        seen.add(frozenset((a, b)))
    assert generated.addition_examples() == list(task.examples)


def test_reverse_words_is_deterministic_and_correct():
    task = get_task("reverse-words")
    assert len(task) == 400
    assert task.examples[0].input == "sock ship fork cat" and task.examples[0].output == "cat fork ship sock"
    inputs = {e.input for e in task.examples}
    assert len(inputs) == 400
    for e in task.examples:
        words = e.input.split()
        assert 3 <= len(words) <= 5 and len(set(words)) == len(words)
        assert e.output.split() == words[::-1] and e.output not in inputs


# --- registration, templates, specs, scoring --------------------------------------------------


@pytest.mark.parametrize("name", NEW_TASKS)
def test_registered_with_templates_and_accepted_by_specs(name):
    from iclit.experiments.spec import parse_spec

    if name in ("antonyms", "translation-en-cs-words") and not (REAL_WORDNET and REAL_FREEDICT):
        pytest.skip("the Debian packages are not installed")
    task = get_task(name)
    assert task.template is TEMPLATES[name]["default"] and len(TEMPLATES[name]) >= 2
    assert task.kind == "generation" and task.metric == "exact" and task.max_new_tokens <= 24
    assert task.description
    assert parse_spec({"task": name, "model": "tiny-random-llama"}).task == name
    assert parse_spec({"task": "addition", "demo_task": name, "model": "tiny-random-llama"}).demo_task == name


def test_task_metric_and_score():
    from iclit.engine.evaluate import score

    ex = get_task("addition").examples[:2]
    exact = Task("t", "generation", ex, Template(), metric="exact")
    assert exact.score_name == "exact_match"
    assert score(exact, ["73", " 1 1 4 "], ["73", "114"]) == [1.0, 0.0]
    assert score(exact, ["cat  dog", "Cat"], ["cat dog", "cat"]) == [1.0, 0.0]  # whitespace only
    chrf = Task("t", "generation", ex, Template())
    assert chrf.metric == "chrf" and chrf.score_name == "chrf"  # generation's default: unchanged
    assert score(chrf, ["73"], ["73"]) == [pytest.approx(100.0)]
    assert get_task("sentiment").score_name == "correct" and get_task("translation-en-cs").metric == "chrf"
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        Task("t", "generation", ex, Template(), metric="bleu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_new_tokens"):
        Task("t", "generation", ex, Template(), max_new_tokens=0)


@pytest.mark.filterwarnings("ignore:the IT arm did not fit")  # one epoch: the tiny model does not learn sums
def test_tiny_model_addition_scored_by_exact_match(tiny, monkeypatch):
    import iclit
    import iclit.engine.readout as readout
    from iclit.report.console import print_summary
    from iclit.tuning import TuningRecipe

    generate = readout.greedy_continuations
    asked = []

    def recording(*args, **kwargs):
        asked.append(kwargs["max_new_tokens"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(readout, "greedy_continuations", recording)
    result = iclit.run_comparison(tiny, "addition", k=2, resamples=2, recipe=TuningRecipe(epochs=1))
    assert asked and set(asked) == {6}  # the task's cap, below the spec's 48
    assert "exact_match" in result.metrics and "chrf" not in result.metrics and "accuracy" not in result.metrics
    for trial in result.trials:
        assert set(trial["exact_match"]) == {"anchor", "icl", "it"} and "chrf" not in trial
        for arm, pred in trial["predictions"].items():
            assert trial["exact_match"][arm] == float(pred == trial["gold"])
    print_summary(result.metrics, result.config)  # the compare command's tables take exact_match
