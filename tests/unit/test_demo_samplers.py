"""Demonstration choice: by sentence-embedding similarity, with wrong labels, from another task."""

from __future__ import annotations

import numpy as np
import pytest

from iclit.tasks import (
    Example,
    Task,
    Template,
    WrongLabelSampler,
    draw_resamples,
    get_sampler,
    get_task,
)
from iclit.tasks.samplers import wrong_count


def small_task(n: int = 12, labels: tuple[str, ...] = ("neg", "pos")) -> Task:
    examples = tuple(Example(id=f"e{i}", input=f"text {i}", output=labels[i % len(labels)]) for i in range(n))
    return Task(name="small", kind="classification", examples=examples, template=Template(), labels=labels)


def test_wrong_count_rounds_half_up() -> None:
    assert [wrong_count(f, 4) for f in (0, 0.1, 0.125, 0.25, 0.5, 1.0)] == [0, 0, 1, 1, 2, 4]
    assert wrong_count(0.5, 3) == 2 and wrong_count(1 / 3, 3) == 1


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_wrong_labels_keep_the_demonstrations(fraction: float) -> None:
    task = get_task("sentiment")
    base = draw_resamples(task, 4, 6, seed=3)
    wrong = draw_resamples(task, 4, 6, seed=3, sampler=WrongLabelSampler("balanced", fraction, task.labels))
    for b, w in zip(base, wrong, strict=True):
        assert b.query == w.query
        assert [d.id for d in b.demonstrations] == [d.id for d in w.demonstrations]
        flipped = [i for i, d in enumerate(w.demonstrations) if "true_output" in d.meta]
        assert len(flipped) == wrong_count(fraction, 4)
        for i, (bd, wd) in enumerate(zip(b.demonstrations, w.demonstrations, strict=True)):
            if i in flipped:
                assert wd.output != bd.output and wd.meta["true_output"] == bd.output
                assert wd.output in task.labels
            else:
                assert wd.output == bd.output


def test_wrong_outputs_for_generation() -> None:
    task = get_task("translation-en-cs")
    draws = draw_resamples(task, 3, 4, seed=0, sampler=WrongLabelSampler("random", 1.0))
    outputs = {e.output for e in task.examples}
    for r in draws:
        for d in r.demonstrations:
            assert d.output != d.meta["true_output"] and d.output in outputs


def test_wrong_label_fraction_checked() -> None:
    with pytest.raises(ValueError, match="wrong-label fraction"):
        WrongLabelSampler("random", 1.5)


def test_cross_task_demonstrations() -> None:
    sentiment, translation = get_task("sentiment"), get_task("translation-en-cs")
    same = draw_resamples(sentiment, 3, 5, seed=1)
    cross = draw_resamples(sentiment, 3, 5, seed=1, demo_task=translation)
    ids = {e.id for e in translation.examples}
    for s, c in zip(same, cross, strict=True):
        assert s.query == c.query  # the queries do not depend on where the demonstrations come from
        assert len(c.demonstrations) == 3 and all(d.id in ids for d in c.demonstrations)
    prompt = sentiment.template.icl_prompt(cross[0].demonstrations, cross[0].query, translation.template)
    assert "English: " in prompt and prompt.endswith("Sentiment:")


@pytest.fixture(scope="module")
def films() -> Task:
    texts = [
        ("f1", "A wonderful film with a moving story and great acting.", "pos"),
        ("f2", "The movie was a delight from start to finish.", "pos"),
        ("t1", "Please file the quarterly tax return before the deadline.", "neg"),
        ("t2", "The invoice number is printed at the top of the page.", "neg"),
        ("w1", "Heavy rain is expected over the mountains tonight.", "neg"),
        ("q", "What a lovely, touching movie; the actors were superb.", "pos"),
    ]
    return Task("films", "classification", tuple(Example(i, t, o) for i, t, o in texts), Template(), ("neg", "pos"))


def test_similarity_samplers(films: Task) -> None:
    from iclit.tasks.embed import cosine_to, embed

    vectors = embed([e.input for e in films.examples])
    assert vectors.shape == (6, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    query = films.examples[-1]
    rng = np.random.default_rng(0)
    most = get_sampler("most-similar").select(query, films.examples, 2, rng)
    least = get_sampler("least-similar").select(query, films.examples, 2, rng)
    assert {d.id for d in most} == {"f1", "f2"}
    assert not {d.id for d in least} & {"f1", "f2"}
    sims = cosine_to(query, most)
    assert sims == sorted(sims)  # the most similar stands next to the query
    assert min(cosine_to(query, most)) > max(cosine_to(query, least))
    # deterministic, whatever the rng
    again = get_sampler("most-similar").select(query, films.examples, 2, np.random.default_rng(99))
    assert [d.id for d in again] == [d.id for d in most]


def test_embed_examples_uses_the_disk_cache(films: Task, tmp_path, monkeypatch) -> None:
    from iclit.tasks import embed as E

    monkeypatch.setenv("ICLIT_CACHE", str(tmp_path))
    first = E.embed_examples(films.examples)
    files = list((tmp_path / "embeddings").glob("*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(np.load(files[0]), first)
    np.testing.assert_array_equal(E.embed_examples(films.examples), first)
