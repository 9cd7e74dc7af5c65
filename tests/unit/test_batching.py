"""core/batching.py: length bucketing, right-padding, and a reused prefix cache (copied per
batch, never written, positions continuing from the prefix; with gradients for tuning),
checked against whole-sequence forwards on the tiny LLaMA; and the shared training loop's
data order."""

from __future__ import annotations

import warnings

import pytest
import torch

from iclit.core.batching import (
    SharedPrefix,
    cache_tensors,
    common_prefix_length,
    expand_cache,
    length_batches,
    micro_batches,
    pad_right,
    padded_groups,
    prefix_cache,
    returned_cache,
    run_decoder,
    with_prefix_mask,
)
from iclit.models.arch import decoder_of
from iclit.tuning import TuningRecipe
from iclit.tuning.loop import epoch_order, train

PREFIX = (
    "Classify the sentiment of the review as positive or negative.\n\nReview: A warm film.\nSentiment: positive\n\n"
)
QUERIES = ["Review: Dull.\nSentiment:", "Review: A sly, grown-up western with a villain you'll remember.\nSentiment:"]


# --- bucketing and padding ------------------------------------------------------------------


def test_length_batches_longest_first_and_complete():
    lengths = [3, 9, 1, 7, 7, 2]
    batches = length_batches(lengths, 4)
    assert [len(b) for b in batches] == [4, 2]
    assert sorted(i for b in batches for i in b) == list(range(6))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)


def test_micro_batches_stay_within_the_token_budget():
    lengths = [10, 3, 8, 8, 2, 5, 30]
    batches = micro_batches(lengths, 24)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 24
    assert batches[0] == [6]  # longer than the budget: alone
    # an item of several rows counts all of them
    assert micro_batches([4, 4], 8, sizes=[2, 1]) == [[0], [1]]


def test_padded_groups_stay_within_the_budget_with_less_padding():
    lengths = [30, 26, 21, 19, 19, 18, 16, 16, 14, 14, 14, 13, 12, 12, 10, 10, 500]
    groups = padded_groups(lengths, 480)
    assert sorted(i for g in groups for sub in g for i in sub) == list(range(len(lengths)))
    padded = lambda sub: len(sub) * max(lengths[i] for i in sub)  # noqa: E731
    for g in groups:
        assert sum(map(padded, g)) <= 480 or g == [[16]]  # one item over the budget: alone
    assert groups[0] == [[16]]
    subs = [sub for g in groups for sub in g]
    assert [lengths[i] for sub in subs for i in sub] == sorted(lengths, reverse=True)  # runs of the sorted order
    old = sum(padded(b) for b in micro_batches(lengths, 480))
    assert sum(map(padded, subs)) < old and len(groups) <= len(micro_batches(lengths, 480))
    assert padded_groups([5, 5, 5], 480) == [[[0, 1, 2]]]  # equal lengths: one forward
    assert padded_groups([], 480) == []


def test_pad_right_and_prefix_mask():
    ids, mask = pad_right([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    assert with_prefix_mask(mask, 2).tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_common_prefix_length_leaves_a_token_to_each():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[1], [1, 2]]) == 0
    assert common_prefix_length([[9, 2], [1, 2]]) == 0


# --- a reused prefix cache --------------------------------------------------------------------


def _encoded(tiny):
    tok = tiny.tokenizer
    seqs = [tok(PREFIX + q)["input_ids"] for q in QUERIES]
    return seqs, common_prefix_length(seqs)


def test_decoder_takes_the_cache_without_deprecation(tiny):
    seqs, p = _encoded(tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cache = prefix_cache(tiny.model, seqs[0][:p])
        ids, mask = pad_right([s[p:] for s in seqs], tiny.tokenizer.pad_token_id)
        run_decoder(
            tiny.model,
            input_ids=ids,
            attention_mask=with_prefix_mask(mask, p),
            cache=expand_cache(cache, 2),
            use_cache=True,
        )
    assert cache.get_seq_length() == p


def test_expanded_prefix_cache_equals_whole_sequences_and_is_never_written(tiny):
    seqs, p = _encoded(tiny)
    assert p > 8
    pad = tiny.tokenizer.pad_token_id
    cache = prefix_cache(tiny.model, seqs[0][:p])
    before = [t.clone() for t in cache_tensors(cache)]
    whole_ids, whole_mask = pad_right(seqs, pad)
    with torch.no_grad():
        whole = decoder_of(tiny.model)(input_ids=whole_ids, attention_mask=whole_mask).last_hidden_state
        ids, mask = pad_right([s[p:] for s in seqs], pad)
        for _ in range(2):  # reused: the second batch sees the same prefix
            fresh = expand_cache(cache, len(seqs))
            out = run_decoder(
                tiny.model, input_ids=ids, attention_mask=with_prefix_mask(mask, p), cache=fresh, use_cache=True
            )
            for row, seq in enumerate(seqs):
                n = len(seq) - p
                torch.testing.assert_close(out.last_hidden_state[row, :n], whole[row, p : len(seq)], atol=1e-5, rtol=0)
            assert returned_cache(out).get_seq_length() == p + ids.shape[1]
    assert cache.get_seq_length() == p
    for t, b in zip(cache_tensors(cache), before, strict=True):
        assert torch.equal(t, b)


def test_shared_prefix_gives_the_whole_sequences_gradient(tiny):
    """Prefix once (as detached leaves), suffixes on top, one backward through the prefix:
    the same loss and parameter gradient as running every sequence whole."""
    seqs, p = _encoded(tiny)
    pad = tiny.tokenizer.pad_token_id
    weight = decoder_of(tiny.model).layers[0].self_attn.q_proj.weight
    weight.requires_grad_(True)
    ids, mask = pad_right(seqs, pad)
    last = mask.sum(dim=1) - 1
    rows = torch.arange(len(seqs))

    hidden = decoder_of(tiny.model)(input_ids=ids, attention_mask=mask).last_hidden_state
    whole_loss = hidden[rows, last].pow(2).sum()
    whole_loss.backward()
    whole_grad = weight.grad.clone()
    weight.grad = None

    shared = SharedPrefix(tiny.model, ids[:1, :p], torch.tensor([0]), train=True)
    assert shared.length == p
    out = run_decoder(
        tiny.model,
        input_ids=ids[:, p:],
        attention_mask=mask,
        cache=shared.for_rows(torch.zeros(2, dtype=torch.long)),
        use_cache=True,
    ).last_hidden_state
    part_loss = out[rows, last - p].pow(2).sum()
    part_loss.backward()
    shared.backward()
    torch.testing.assert_close(part_loss, whole_loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(weight.grad, whole_grad, atol=1e-4, rtol=1e-4)
    assert shared.cache.get_seq_length() == p  # the micro-batch appended to its own copy
    weight.requires_grad_(False)


# --- the training loop ----------------------------------------------------------------------------


def test_epoch_order_draws_only_when_a_group_takes_several_steps():
    g = torch.Generator().manual_seed(0)
    assert epoch_order([4, 5, 6], 3, g) == [4, 5, 6]
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn
    got = epoch_order([4, 5, 6], 2, g)
    want = [[4, 5, 6][i] for i in torch.randperm(3, generator=torch.Generator().manual_seed(0)).tolist()]
    assert got == want


def test_train_steps_groups_together_and_records_their_losses():
    """Two groups of different sizes: each step takes every group's next slice; a group's
    loss is recorded only for steps that had its rows; capture steps are called in eval mode."""
    model = torch.nn.Linear(1, 1)
    w = torch.nn.Parameter(torch.zeros(1))
    seen_rows, called, clipped = [], [], []

    def step_loss(rows):
        seen_rows.append(list(rows))
        (w * len(rows)).sum().backward()
        return torch.tensor([float(len(rows)), -1.0])

    recipe = TuningRecipe(epochs=2, batch_size=2)
    results = train(
        model,
        recipe,
        [w],
        [[0, 1, 2, 3], [4, 5]],
        [0, 1],
        step_loss=step_loss,
        clip=clipped.append,
        final_loss=lambda: torch.tensor([7.0, 8.0]),
        on_step=lambda s: called.append((s, model.training)),
    )
    assert len(seen_rows) == 4  # 2 steps per epoch (the larger group's), 2 epochs
    assert all(sorted(r) == [0, 1, 2, 3, 4, 5] for r in (seen_rows[0] + seen_rows[1], seen_rows[2] + seen_rows[3]))
    assert [len(r) for r in seen_rows] == [4, 2, 4, 2]
    assert results[0].losses == [4.0, 2.0, 4.0, 2.0]
    assert results[1].losses == [-1.0, -1.0]  # its rows fill only the first step of an epoch
    assert [r.final_loss for r in results] == [7.0, 8.0]
    assert clipped == [recipe.max_grad_norm] * 4
    assert called == [] and not model.training
    with pytest.raises(ValueError, match="same number of steps per epoch"):
        train(
            model,
            TuningRecipe(epochs=2, batch_size=2, capture_steps=(1,)),
            [w],
            [[0, 1, 2, 3], [4, 5]],
            [0, 1],
            step_loss=step_loss,
            clip=clipped.append,
            final_loss=lambda: torch.zeros(2),
        )
    called.clear()
    train(
        model,
        TuningRecipe(epochs=2, capture_steps=(2,)),
        [w],
        [[0, 1]],
        [0],
        step_loss=lambda rows: step_loss(rows)[:1],
        clip=clipped.append,
        final_loss=lambda: torch.zeros(1),
        on_step=lambda s: called.append((s, model.training)),
    )
    assert called == [(2, False)]


def test_tuning_split_benchmark_runs_and_agrees():
    """benchmarks/tuning_split.py (the sub-batches vs one padded forward per micro-batch) on
    the tiny model: both sides train the same adapters to the same final losses."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "tuning_split.py"
    args = ["--model", "tiny-random-llama", "--adapters", "2", "--epochs", "1", "--reps", "1"]
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=True).stdout
    ratio = [line for line in out.splitlines() if line.startswith("RATIO name=tuning_split")]
    assert len(ratio) == 1 and ratio[0].endswith("agree=true"), out
