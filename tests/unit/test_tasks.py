"""Tasks: built-in data, templates, file loaders and their errors, samplers."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from iclit.tasks import (
    TEMPLATES,
    Example,
    Task,
    TaskDataError,
    Template,
    check_enough,
    draw_resamples,
    get_sampler,
    get_task,
    get_template,
    list_tasks,
    load_examples,
    load_hf_dataset,
    load_task,
    reference_prompts,
)


def write_jsonl(path: Path, rows: list[dict], raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for lineno, text in (raw_lines or {}).items():
        lines.insert(lineno - 1, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def small_task(n: int = 12, labels: tuple[str, ...] = ("neg", "pos")) -> Task:
    examples = tuple(Example(id=f"e{i}", input=f"text {i}", output=labels[i % len(labels)]) for i in range(n))
    return Task(name="small", kind="classification", examples=examples, template=Template(), labels=labels)


# --- built-in tasks ----------------------------------------------------------------------


def test_sentiment_builtin() -> None:
    task = get_task("sentiment")
    assert task.kind == "classification"
    assert task.labels == ("negative", "positive")
    assert len(task) == 344
    assert Counter(e.output for e in task.examples) == {"positive": 172, "negative": 172}
    assert Counter(e.meta["domain"] for e in task.examples) == {"movie": 172, "product": 172}
    assert task.examples[0].id == "sent-0001"
    assert len({e.id for e in task.examples}) == len(task)
    assert task.template.instruction == "Classify the sentiment of the review as positive or negative."
    assert task.template.input_prefix == "Review: " and task.template.output_prefix == "Sentiment:"
    assert get_task("sentiment") is task  # cached


def test_translation_builtin() -> None:
    task = get_task("translation-en-cs")
    assert task.kind == "generation" and task.labels is None
    assert len(task) == 205
    first = task.examples[0]
    assert first.id == "encs-0001" and first.input.startswith("Although") and "zpoždění" in first.output
    assert task.template.instruction == "Translate the English sentence into Czech."
    assert task.template.output_prefix == "Czech:"


def test_list_tasks_and_reference_prompts() -> None:
    rows = {name: (kind, n, desc) for name, kind, n, desc in list_tasks()}
    assert rows["sentiment"][:2] == ("classification", 344)
    assert rows["translation-en-cs"][:2] == ("generation", 205)
    assert all(desc for _, _, desc in rows.values())
    prompts = reference_prompts()
    assert len(prompts) == 120 and all(isinstance(p, str) and p for p in prompts)
    prompts.clear()  # a copy: the cached data is not affected
    assert len(reference_prompts()) == 120


def test_named_templates() -> None:
    qa = get_template("sentiment", "qa")
    assert qa.input_prefix == "Text: " and qa.output_prefix == "Is the text positive or negative? Answer:"
    assert get_template("sentiment") is get_task("sentiment").template
    for task_name, options in TEMPLATES.items():
        assert "default" in options and len(options) >= 2
        assert get_task(task_name).template == options["default"]
    with pytest.raises(TaskDataError, match="no template 'nope'.*qa"):
        get_template("sentiment", "nope")


# --- templates -----------------------------------------------------------------------------


def test_template_rendering() -> None:
    task = get_task("sentiment")
    tpl = task.template
    demos = task.examples[:3]
    query = task.examples[10]

    q = tpl.query(query.input)
    assert q.startswith(tpl.instruction) and q.endswith("Review: " + query.input + "\nSentiment:")

    prompt = tpl.icl_prompt(demos, query)
    assert prompt.startswith(tpl.instruction + "\n\n")
    assert prompt.count(tpl.instruction) == 1  # once, not once per demonstration
    assert prompt.endswith("Review: " + query.input + "\nSentiment:")
    positions = [prompt.index(f"Review: {d.input}\nSentiment: {d.output}") for d in demos]
    assert positions == sorted(positions)  # in order
    assert positions[-1] < prompt.index(query.input)  # then the query
    assert prompt == tpl.icl_prefix(demos) + tpl.query(query.input, with_instruction=False)

    prompt_text, answer = tpl.training_pair(demos[0])
    assert prompt_text == tpl.query(demos[0].input) and answer == " " + demos[0].output

    plain = tpl.replace(instruction=None)
    assert plain.query(query.input) == f"Review: {query.input}\nSentiment:"
    assert plain.icl_prompt(demos, query).startswith("Review: " + demos[0].input)
    assert plain.icl_prompt([], query) == plain.query(query.input)


# --- loaders: good files -------------------------------------------------------------------


def test_load_jsonl_task(tmp_path: Path) -> None:
    rows = [{"input": f"t{i}", "output": "yes" if i % 2 else "no", "extra": i} for i in range(6)]
    path = write_jsonl(tmp_path / "yn.jsonl", rows, raw_lines={3: ""})  # a blank line is skipped
    task = load_task(path)
    assert task.name == "yn" and task.kind == "classification"
    assert task.labels == ("no", "yes")  # sorted set of outputs
    assert [e.id for e in task.examples] == [f"yn-{i}" for i in range(1, 7)]
    assert task.examples[1].meta == {"extra": 1}
    assert task.template == Template(input_prefix="Input: ", output_prefix="Output:")
    assert task.source == str(path)


def test_load_csv_with_mapping_and_verbalizer(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "reviews.csv",
        ["uid", "review", "stars", "src"],
        [["a", "great", 1, "web"], ["b", " awful ", 0, "web"], ["c", "fine", 1, "shop"]],
    )
    task = load_task(
        path,
        input_field="review",
        output_field="stars",
        id_field="uid",
        verbalizer={"0": "negative", "1": "positive"},
    )
    assert task.labels == ("negative", "positive")  # the verbalizer's words, in its order
    assert [(e.id, e.input, e.output) for e in task.examples] == [
        ("a", "great", "positive"),
        ("b", "awful", "negative"),
        ("c", "fine", "positive"),
    ]
    assert task.examples[2].meta == {"src": "shop"}
    # int keys in the verbalizer work too
    again = load_examples(path, input_field="review", output_field="stars", verbalizer={0: "neg", 1: "pos"})
    assert [e.output for e in again] == ["pos", "neg", "pos"]


def test_load_parquet_with_mapping_and_verbalizer(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    pd.DataFrame({"sentence": ["good", "bad", "meh but ok"], "label": [1, 0, 1], "topic": ["a", "b", "c"]}).to_parquet(
        path
    )
    examples = load_examples(
        path,
        input_field="sentence",
        output_field="label",
        verbalizer={"0": "negative", "1": "positive"},
        labels=["negative", "positive"],
        meta_fields=("topic",),
    )
    assert [(e.id, e.output) for e in examples] == [
        ("data-1", "positive"),
        ("data-2", "negative"),
        ("data-3", "positive"),
    ]
    assert examples[0].meta == {"topic": "a"}
    task = get_task(str(path), input_field="sentence", output_field="label", kind="generation")
    assert task.kind == "generation" and task.labels is None and task.examples[0].output == "1"


def test_get_task_loads_a_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": f"x{i}", "a": f"y{i}"} for i in range(3)])
    task = get_task(str(path), input_field="q", output_field="a", kind="generation", name="mine")
    assert task.name == "mine" and len(task) == 3


# --- loaders: errors -----------------------------------------------------------------------


def test_error_missing_field(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "x"}] * 5 + [{"label": "y"}]
    path = write_jsonl(tmp_path / "x.jsonl", [dict(r, id=str(i)) for i, r in enumerate(rows)])
    with pytest.raises(TaskDataError) as err:
        load_examples(path, input_field="text", output_field="label")
    assert str(err.value) == f"{path} line 6: missing field 'text'"


def test_error_missing_csv_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", ["text", "label"], [["a", "pos"]])
    with pytest.raises(TaskDataError) as err:
        load_examples(path, input_field="review", output_field="label")
    msg = str(err.value)
    assert str(path) in msg and "line 1" in msg and "'review'" in msg and "text" in msg


def test_error_empty_field(tmp_path: Path) -> None:
    rows = [
        {"text": "a", "label": "x"},
        {"text": "b", "label": "y"},
        {"text": "c", "label": "x"},
        {"text": "  ", "label": "y"},
    ]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(TaskDataError) as err:
        load_examples(path, input_field="text", output_field="label")
    assert str(err.value) == f"{path} line 4: field 'text' is empty"
    path2 = write_jsonl(tmp_path / "n.jsonl", [{"text": "a", "label": None}])
    with pytest.raises(TaskDataError, match="line 1: field 'label' is empty"):
        load_examples(path2, input_field="text", output_field="label")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_error_empty_jsonl(tmp_path: Path, content: str) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TaskDataError) as err:
        load_task(path)
    assert str(err.value) == f"{path}: file is empty"


def test_error_empty_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", ["input", "output"], [])
    with pytest.raises(TaskDataError, match="file is empty") as err:
        load_task(path)
    assert str(path) in str(err.value)


def test_error_invalid_json(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"input": "a", "output": "b"}], raw_lines={2: '{"input": "oops",'})
    with pytest.raises(TaskDataError) as err:
        load_task(path)
    msg = str(err.value)
    assert msg.startswith(f"{path} line 2: not valid JSON (")


def test_error_label_outside_labels_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", ["text", "label"], [["a", "positive"], ["b", "neutral"], ["c", "negative"]])
    with pytest.raises(TaskDataError) as err:
        load_task(path, input_field="text", output_field="label", labels=["negative", "positive"])
    assert str(err.value) == (
        f"{path} line 3: field 'label' value 'neutral' is not one of the labels ['negative', 'positive']"
    )


def test_error_label_outside_verbalizer(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", ["text", "label"], [["a", 0], ["b", 1], ["c", 2]])
    with pytest.raises(TaskDataError) as err:
        load_task(path, input_field="text", output_field="label", verbalizer={"0": "negative", "1": "positive"})
    msg = str(err.value)
    assert msg.startswith(f"{path} line 4: field 'label' value '2' is not in the verbalizer")
    assert "['0', '1']" in msg


def test_error_verbalised_label_outside_labels(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"input": "a", "output": 0}, {"input": "b", "output": 1}])
    with pytest.raises(TaskDataError, match=r"line 2: field 'output' value 'good' \(verbalised from '1'\)"):
        load_task(path, verbalizer={0: "bad", 1: "good"}, labels=["bad", "fine"])


def test_error_single_label(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"input": "a", "output": "same"}, {"input": "b", "output": "same"}])
    with pytest.raises(TaskDataError, match="at least 2 labels.*'same'.*generation"):
        load_task(path)


def test_error_duplicate_id(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"id": "a", "input": "x", "output": "y"}] * 2)
    with pytest.raises(TaskDataError, match=r"line 2: field 'id' value 'a' is a duplicate \(first on line 1\)"):
        load_task(path, id_field="id", kind="generation")


def test_error_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("input\toutput\n", encoding="utf-8")
    with pytest.raises(TaskDataError) as err:
        load_task(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: unsupported file extension '.txt'")
    assert ".jsonl" in msg and ".csv" in msg and ".parquet" in msg


def test_error_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match="file not found"):
        get_task(str(tmp_path / "absent.jsonl"))


def test_error_unknown_task_name() -> None:
    with pytest.raises(TaskDataError) as err:
        get_task("sentimnet")
    msg = str(err.value)
    assert "'sentimnet'" in msg and "sentiment" in msg and "translation-en-cs" in msg
    assert ".jsonl" in msg and ".csv" in msg and ".parquet" in msg


def test_error_loader_options_on_builtin() -> None:
    with pytest.raises(TaskDataError, match="built in"):
        get_task("sentiment", input_field="x")


def test_get_task_lays_a_template_mapping_over_the_tasks_own(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "rev.csv", ["text", "label"], [[f"review {i}", i % 2] for i in range(6)])
    task = get_task(
        path,
        input_field="text",
        output_field="label",
        verbalizer={0: "bad", 1: "good"},
        template={"instruction": "Good or bad?", "input_prefix": "Review: ", "demo_sep": "\n---\n"},
    )
    assert task.labels == ("bad", "good") and task.examples[0].output == "bad"
    assert task.template == Template(
        instruction="Good or bad?", input_prefix="Review: ", output_prefix="Output:", demo_sep="\n---\n"
    )
    assert task.template.query("x").startswith("Good or bad?\n\nReview: x\nOutput:")
    plain = get_task(path, input_field="text", output_field="label")
    assert plain.template == Template(input_prefix="Input: ", output_prefix="Output:")  # the file's own default
    builtin = get_task("sentiment", template={"output_prefix": "Label:"})  # a template applies to built-ins too
    assert builtin.template == get_template("sentiment").replace(output_prefix="Label:")
    assert get_task("sentiment").template == get_template("sentiment")  # the cached task is untouched
    assert get_task("sentiment", template=Template(name="mine")).template.name == "mine"
    with pytest.raises(TaskDataError, match="unknown template field 'prefix'"):
        get_task("sentiment", template={"prefix": "x"})


def test_resolve_task_applies_the_named_template_and_the_instruction(tmp_path: Path) -> None:
    from iclit.tasks import is_builtin, resolve_task

    assert resolve_task("sentiment", "qa").template == get_template("sentiment", "qa")
    assert resolve_task("sentiment", instruction=False).template.instruction is None
    path = write_jsonl(tmp_path / "t.jsonl", [{"input": f"q{i}", "output": f"a{i}"} for i in range(4)])
    t = resolve_task(
        str(path), "default", False, options={"kind": "generation", "template": {"instruction": "Answer."}}
    )
    assert t.kind == "generation" and t.template.instruction is None
    assert is_builtin("sentiment") and not is_builtin(str(path))


def test_error_too_few_examples(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"input": f"t{i}", "output": "ab"[i % 2]} for i in range(3)])
    task = load_task(path)
    with pytest.raises(TaskDataError) as err:
        check_enough(task, 4, str(path))
    assert str(err.value) == f"{path}: needs at least k+1 = 5 examples (4 demonstrations + 1 query), found 3"
    check_enough(task, 2, str(path))  # 3 examples suffice for k=2
    with pytest.raises(TaskDataError, match=f"{path}: needs at least k\\+1 = 5"):
        draw_resamples(task, k=4, n=1, seed=0)  # the task's source names the file


def test_error_hf_without_datasets() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(TaskDataError, match="pip install datasets.*network"):
            load_hf_dataset("some/dataset", input_field="text", output_field="label")
    else:
        pytest.skip("datasets is installed")


# --- samplers ------------------------------------------------------------------------------


def _ids(resamples: list) -> list[tuple[str, tuple[str, ...]]]:
    return [(r.query.id, tuple(d.id for d in r.demonstrations)) for r in resamples]


@pytest.mark.parametrize("task_name", ["sentiment", "translation-en-cs"])
def test_resamples_deterministic_and_seed_dependent(task_name: str) -> None:
    task = get_task(task_name)
    a = draw_resamples(task, k=4, n=20, seed=7)
    b = draw_resamples(task, k=4, n=20, seed=7)
    c = draw_resamples(task, k=4, n=20, seed=8)
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(c)
    assert [r.index for r in a] == list(range(20))


@pytest.mark.parametrize("sampler", ["random", "balanced"])
def test_query_never_in_demonstrations_and_queries_distinct(sampler: str) -> None:
    task = small_task(n=9)
    resamples = draw_resamples(task, k=8, n=9, seed=3, sampler=sampler)  # demos = all but the query
    for r in resamples:
        assert r.query.id not in {d.id for d in r.demonstrations}
        assert len({d.id for d in r.demonstrations}) == 8
    assert len({r.query.id for r in resamples}) == 9


def test_balanced_counts() -> None:
    task = get_task("sentiment")
    for r in draw_resamples(task, k=4, n=50, seed=0):
        assert Counter(d.output for d in r.demonstrations) == {"negative": 2, "positive": 2}
    for r in draw_resamples(task, k=5, n=50, seed=0):
        assert sorted(Counter(d.output for d in r.demonstrations).values()) == [2, 3]
    orders = {tuple(d.output for d in r.demonstrations) for r in draw_resamples(task, k=4, n=50, seed=0)}
    assert len(orders) > 1  # shuffled, not grouped by label


def test_balanced_falls_back_when_a_label_is_short() -> None:
    examples = tuple(Example(id=f"e{i}", input=str(i), output="rare" if i == 0 else "common") for i in range(10))
    task = Task(name="skew", kind="classification", examples=examples, template=Template(), labels=("common", "rare"))
    sampler = get_sampler("balanced")
    demos = sampler.select(examples[5], examples, 6, np.random.default_rng(0))
    assert Counter(d.output for d in demos) == {"rare": 1, "common": 5}
    assert examples[5] not in demos
    assert draw_resamples(task, k=6, n=10, seed=1)  # works for every query


def test_prefix_property() -> None:
    for name in ("sentiment", "translation-en-cs"):
        task = get_task(name)
        assert _ids(draw_resamples(task, k=4, n=10, seed=11)) == _ids(draw_resamples(task, k=4, n=30, seed=11))[:10]


def test_k_zero() -> None:
    task = get_task("sentiment")
    resamples = draw_resamples(task, k=0, n=5, seed=0)
    assert len(resamples) == 5 and all(r.demonstrations == () for r in resamples)
    r = resamples[0]
    assert task.template.icl_prompt(r.demonstrations, r.query) == task.template.query(r.query.input)


def test_too_many_resamples_and_unknown_sampler() -> None:
    task = small_task(n=6)
    with pytest.raises(TaskDataError, match="7 resamples need 7 distinct queries.*only 6"):
        draw_resamples(task, k=2, n=7, seed=0)
    with pytest.raises(TaskDataError, match="unknown sampler 'nope'.*balanced.*random"):
        draw_resamples(task, k=2, n=2, seed=0, sampler="nope")
