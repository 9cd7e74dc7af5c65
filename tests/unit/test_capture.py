"""capture.py: last-token per-layer states, label scores and greedy continuations, checked
against transformers' own forward pass and ``generate`` on the tiny random LLaMA."""

from __future__ import annotations

import pytest
import torch

from iclit.core.tokens import label_token_ids
from iclit.engine.capture import capture, forward_last_states, greedy_continuations
from iclit.models.arch import layers_of

ATOL = 1e-5

SHORT = "Hi"
MEDIUM = "Review: The plot is thin but the actors carry it.\nSentiment:"
LONG = (
    "Classify the sentiment of the review as positive or negative.\n\n"
    + "Review: I would like to learn how to cook traditional Czech dishes, especially dumplings "
    "and goulash.\nSentiment: positive\n\n" * 6 + "Review: The train was delayed by almost an hour.\nSentiment:"
)
PROMPTS = [MEDIUM, SHORT, LONG, "English: Please open your books on page twelve.\nCzech:"]


def reference(lm, prompt: str):
    """(states [L+1, d], logits [V]) at the last token from a plain HF forward, no padding."""
    enc = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = lm.model(**enc, output_hidden_states=True)
    states = torch.stack([h[0, -1] for h in out.hidden_states])
    return states, out.logits[0, -1]


def test_prompts_have_very_different_lengths(tiny):
    lengths = [len(tiny.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert min(lengths) <= 3 and max(lengths) >= 100


def test_states_equal_output_hidden_states(tiny):
    cap = capture(tiny.model, tiny.tokenizer, PROMPTS, batch_size=1)
    n_states = tiny.n_layers + 1
    assert cap.states.shape == (len(PROMPTS), n_states, tiny.hidden_size)
    assert cap.states.dtype == torch.float32
    assert cap.label_logits is None and cap.label_logprobs is None
    for i, prompt in enumerate(PROMPTS):
        ref, _ = reference(tiny, prompt)
        assert ref.shape == (n_states, tiny.hidden_size)
        torch.testing.assert_close(cap.states[i], ref, atol=ATOL, rtol=0)


def test_states_do_not_depend_on_batching_or_padding(tiny):
    one = capture(tiny.model, tiny.tokenizer, PROMPTS, batch_size=1).states
    all_in_one = capture(tiny.model, tiny.tokenizer, PROMPTS, batch_size=8).states
    pairs = capture(tiny.model, tiny.tokenizer, PROMPTS, batch_size=2).states
    torch.testing.assert_close(all_in_one, one, atol=ATOL, rtol=0)
    torch.testing.assert_close(pairs, one, atol=ATOL, rtol=0)
    # the short prompt padded to the long one's length in one batch
    padded = capture(tiny.model, tiny.tokenizer, [LONG, SHORT], batch_size=2).states
    alone = capture(tiny.model, tiny.tokenizer, [SHORT], batch_size=1).states
    torch.testing.assert_close(padded[1], alone[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(padded[0], one[2], atol=ATOL, rtol=0)


def test_padded_last_state_is_not_the_pad_position(tiny):
    """Guard against taking position -1 of a right-padded row: the short prompt's states
    must differ from the states at the pad position of the padded batch."""
    tok = tiny.tokenizer
    ids_long, ids_short = tok(LONG)["input_ids"], tok(SHORT)["input_ids"]
    width = len(ids_long)
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    ids[0], mask[0] = torch.tensor(ids_long), 1
    ids[1, : len(ids_short)], mask[1, : len(ids_short)] = torch.tensor(ids_short), 1
    got = forward_last_states(tiny.model, ids, mask)
    ref, _ = reference(tiny, SHORT)
    torch.testing.assert_close(got[1], ref, atol=ATOL, rtol=0)


def test_output_order_follows_input_order(tiny):
    """capture groups prompts by length internally; rows must come back in input order."""
    cap = capture(tiny.model, tiny.tokenizer, PROMPTS, batch_size=3)
    for i, prompt in enumerate(PROMPTS):
        alone = capture(tiny.model, tiny.tokenizer, [prompt]).states[0]
        torch.testing.assert_close(cap.states[i], alone, atol=ATOL, rtol=0)


def test_label_logits_and_logprobs(tiny):
    tok = tiny.tokenizer
    label_ids = label_token_ids(tok, [" negative", " positive"])
    cap = capture(tiny.model, tok, PROMPTS, label_ids=label_ids, batch_size=8)
    assert cap.label_logits.shape == (len(PROMPTS), 2)
    assert cap.label_logprobs.shape == (len(PROMPTS), 2)
    for i, prompt in enumerate(PROMPTS):
        _, logits = reference(tiny, prompt)
        torch.testing.assert_close(cap.label_logits[i], logits[label_ids], atol=ATOL, rtol=0)
        full_logprobs = torch.log_softmax(logits.double(), dim=-1)[label_ids].float()
        torch.testing.assert_close(cap.label_logprobs[i], full_logprobs, atol=ATOL, rtol=0)
        assert (cap.label_logprobs[i] < 0).all()


def test_label_ids_only_select_rows(tiny):
    """A single arbitrary vocabulary id works too and matches the full logits."""
    ids = torch.tensor([7, 123, 599])
    cap = capture(tiny.model, tiny.tokenizer, [MEDIUM], label_ids=ids)
    _, logits = reference(tiny, MEDIUM)
    torch.testing.assert_close(cap.label_logits[0], logits[ids], atol=ATOL, rtol=0)


def test_capture_leaves_no_hooks(tiny):
    capture(tiny.model, tiny.tokenizer, PROMPTS, label_ids=torch.tensor([3, 4]))
    for layer in layers_of(tiny.model):
        assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_label_token_ids_first_tokens(tiny):
    tok = tiny.tokenizer
    ids = label_token_ids(tok, [" negative", " positive"])
    assert ids.dtype == torch.long
    assert ids.tolist() == [
        tok(" negative", add_special_tokens=False)["input_ids"][0],
        tok(" positive", add_special_tokens=False)["input_ids"][0],
    ]


def test_label_token_ids_rejects_shared_first_token(tiny):
    tok = tiny.tokenizer
    a, b = " positive", " positively"

    def first(s):
        return tok(s, add_special_tokens=False)["input_ids"][0]

    assert first(a) == first(b), "precondition: the two labels share a first token"
    with pytest.raises(ValueError, match="share a first token"):
        label_token_ids(tok, [a, b])


def test_label_token_ids_rejects_empty_label(tiny):
    with pytest.raises(ValueError, match="tokenises to nothing"):
        label_token_ids(tiny.tokenizer, [" positive", ""])


def generate_one(lm, prompt: str, max_new_tokens: int) -> str:
    enc = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
        )
    return lm.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_greedy_equals_generate_one_at_a_time(tiny):
    expected = [generate_one(tiny, p, 12).strip() for p in PROMPTS]
    assert len(set(expected)) > 1  # the prompts do give different continuations
    got = greedy_continuations(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=12, stop="", batch_size=8)
    assert got == expected
    got_single = greedy_continuations(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=12, stop="", batch_size=1)
    assert got_single == expected


def test_greedy_restores_padding_side(tiny):
    assert tiny.tokenizer.padding_side == "right"
    greedy_continuations(tiny.model, tiny.tokenizer, [SHORT, MEDIUM], max_new_tokens=2)
    assert tiny.tokenizer.padding_side == "right"


def test_greedy_cuts_at_stop_string(tiny):
    raw = generate_one(tiny, MEDIUM, 16)
    full = raw.strip()
    # a non-space character from the middle of the continuation acts as the stop string
    middle = [c for c in full[2:-1] if not c.isspace()]
    assert middle, f"continuation too short to test a stop string: {full!r}"
    stop = middle[len(middle) // 2]
    expected = raw.split(stop)[0].strip()
    got = greedy_continuations(tiny.model, tiny.tokenizer, [MEDIUM], max_new_tokens=16, stop=stop)
    assert got == [expected]
    assert stop not in got[0]
    assert len(got[0]) < len(full)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_greedy_stops_early_and_gives_what_cutting_gives(tiny, batch_size):
    """Rows stop decoding at their stop string (a batch at its last row's): every answer is
    the full-length continuation cut at the stop, and fewer tokens are generated."""
    full = [generate_one(tiny, p, 16) for p in PROMPTS]
    chars = [c for f in full for c in f.strip()[1:] if not c.isspace()]
    stop = max(set(chars), key=chars.count)  # the commonest character: most rows stop early
    expected = [f.split(stop)[0].strip() for f in full]
    calls = []
    generate = tiny.model.generate

    def counting(*args, **kwargs):
        out = generate(*args, **kwargs)
        calls.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    tiny.model.generate = counting
    try:
        got = greedy_continuations(
            tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=16, stop=stop, batch_size=batch_size
        )
    finally:
        del tiny.model.generate
    assert got == expected
    assert sum(calls) < 16 * len(calls)  # some batch stopped before max_new_tokens


# --- shared-prefix (KV cache) path --------------------------------------------------------

DEMOS = (
    "Classify the sentiment of the review as positive or negative.\n\n"
    "Review: The book arrived in perfect condition.\nSentiment: positive\n\n"
    "Review: It broke after two days.\nSentiment: negative\n\n"
)
QUERIES = [
    "Review: Fine.\nSentiment:",
    "Review: A sly, grown-up western with gorgeous landscapes and a villain you'll remember.\nSentiment:",
    "Review: The plot is thin but the actors carry it.\nSentiment:",
]


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_prefix_cache_equals_uncached(tiny, batch_size):
    tok = tiny.tokenizer
    prompts = [DEMOS + q for q in QUERIES]
    label_ids = label_token_ids(tok, [" negative", " positive"])
    plain = capture(tiny.model, tok, prompts, label_ids=label_ids)
    cached = capture(
        tiny.model, tok, prompts, label_ids=label_ids, prefixes=[DEMOS] * len(prompts), batch_size=batch_size
    )
    torch.testing.assert_close(cached.states, plain.states, atol=ATOL, rtol=0)
    torch.testing.assert_close(cached.label_logits, plain.label_logits, atol=ATOL, rtol=0)
    for i, prompt in enumerate(prompts):
        ref, _ = reference(tiny, prompt)
        torch.testing.assert_close(cached.states[i], ref, atol=ATOL, rtol=0)
    # the shared prefix cache is not corrupted by use: a second run gives the same states
    again = capture(
        tiny.model, tok, prompts, label_ids=label_ids, prefixes=[DEMOS] * len(prompts), batch_size=batch_size
    )
    torch.testing.assert_close(again.states, cached.states, atol=0, rtol=0)


def test_prefix_cache_with_boundary_inside_a_word(tiny):
    """A text prefix that ends mid-word: the tokens merge across the boundary, so the cached
    part must be cut where the tokenised prompts agree, never at the text boundary."""
    tok = tiny.tokenizer
    prefix = DEMOS + "Review: gre"
    prompts = [prefix + "at acting.\nSentiment:", prefix + "y and dull.\nSentiment:", prefix + "en\nSentiment:"]
    cached = capture(tiny.model, tok, prompts, prefixes=[prefix] * 3, batch_size=3)
    for i, prompt in enumerate(prompts):
        ref, _ = reference(tiny, prompt)
        torch.testing.assert_close(cached.states[i], ref, atol=ATOL, rtol=0)


def test_mixed_prefix_groups_keep_input_order(tiny):
    tok = tiny.tokenizer
    other = "Translate the English sentence into Czech.\n\nEnglish: Good morning.\nCzech: Dobré ráno.\n\n"
    prompts = [
        DEMOS + QUERIES[0],
        other + "English: Thank you.\nCzech:",
        SHORT,
        DEMOS + QUERIES[1],
        other + "English: See you tomorrow.\nCzech:",
    ]
    prefixes = [DEMOS, other, None, DEMOS, other]
    cached = capture(tiny.model, tok, prompts, prefixes=prefixes, batch_size=2)
    for i, prompt in enumerate(prompts):
        ref, _ = reference(tiny, prompt)
        torch.testing.assert_close(cached.states[i], ref, atol=ATOL, rtol=0)
