"""Constrained beam search: only corpus identifiers come out, ranked by their sequence log-probability."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from avg.decode import TrieLogitsProcessor, retrieve, token_trie  # noqa: E402
from avg.model import build_model  # noqa: E402
from helpers_configs import model_config  # noqa: E402
from avg.trie import prefix_allowed_tokens_fn  # noqa: E402

SIZES = [5, 4, 6]
TINY = dict(encoder_init="random", shared_vokens=True, freeze_encoder=False, decoder_layers=1, decoder_hidden=32, decoder_heads=2, decoder_ffn=64,
            encoder_overrides=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
WORDS = ["red", "apple", "dog", "blue", "house", "a", "small", "lemon", "the", "tree"]


@pytest.fixture(scope="module")
def vm():
    torch.set_num_threads(1)
    model = build_model(model_config(TINY, shared_vokens=False, voken_init="random"), SIZES, seed=3)
    model.model.eval()
    return model


def all_codes() -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(k) for k in SIZES], indexing="ij"), -1).reshape(-1, len(SIZES))


@st.composite
def corpora(draw):
    codes = all_codes()
    rows = draw(st.lists(st.integers(0, len(codes) - 1), min_size=1, max_size=30, unique=True))
    caption = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6)))
    beams = draw(st.integers(1, 12))
    return codes[rows], caption, beams


@settings(max_examples=25, deadline=None)
@given(corpora())
def test_decoding_only_returns_identifiers_of_the_trie_ranked(vm, case):
    codes, caption, beams = case
    trie = token_trie(vm, codes, values=np.arange(len(codes)))
    res = retrieve(vm, [caption], trie, num_beams=beams)
    vals, scores, toks = res.values[0], res.scores[0], res.tokens[0]
    n_found = int((vals >= 0).sum())
    assert n_found == min(beams, len(codes))                  # the beam fills up when the corpus allows it
    assert (vals[:n_found] >= 0).all() and (vals[n_found:] == -1).all()   # padding only at the end
    assert len(set(vals[:n_found].tolist())) == n_found       # no identifier twice
    member = {tuple(r) for r in vm.spec.codes_to_tokens(codes).tolist()}
    for v, t in zip(vals[:n_found], toks[:n_found]):
        assert tuple(t.tolist()) in member                     # generated tokens are a corpus identifier ...
        assert np.array_equal(vm.spec.tokens_to_codes(t), codes[v])   # ... and map back to the right image
    assert np.all(np.diff(scores[:n_found]) <= 1e-6)          # best first
    assert np.isneginf(scores[n_found:]).all()


def test_beam_covering_the_corpus_is_exact_ranking(vm):
    """With beams >= corpus size nothing is pruned: beam order == brute-force sequence log-prob order."""
    rng = np.random.default_rng(0)
    codes = all_codes()[rng.choice(len(all_codes()), 12, replace=False)]
    trie = token_trie(vm, codes)
    captions = ["a red apple", "the small dog"]
    res = retrieve(vm, captions, trie, num_beams=12)
    with torch.no_grad():
        cands = torch.as_tensor(vm.spec.codes_to_tokens(codes))[None].repeat(2, 1, 1)
        brute = vm.sequence_logprobs(vm.tokenize(captions), cands).numpy()
    for i in range(2):
        assert np.array_equal(res.values[i], np.argsort(-brute[i], kind="stable"))
        np.testing.assert_allclose(res.scores[i], np.sort(brute[i])[::-1], rtol=1e-4, atol=1e-4)


def test_batched_decoding_equals_one_at_a_time(vm):
    codes = all_codes()[::3]
    trie = token_trie(vm, codes)
    caps = ["a red apple", "dog", "the small blue house", "lemon tree"]
    together = retrieve(vm, caps, trie, num_beams=5, batch_size=4)
    single = [retrieve(vm, [c], trie, num_beams=5, batch_size=1) for c in caps]
    assert np.array_equal(together.values, np.concatenate([s.values for s in single]))


def test_genre_style_prefix_fn_agrees_with_the_processor(vm):
    codes = all_codes()[::4]
    trie = token_trie(vm, codes)
    enc = vm.tokenize(["a small lemon"])
    kw = dict(num_beams=4, num_return_sequences=4, max_new_tokens=3, length_penalty=0.0, do_sample=False)
    with torch.no_grad():
        a = vm.model.generate(**enc, logits_processor=[TrieLogitsProcessor(trie)], **kw)
        b = vm.model.generate(**enc, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn(trie), **kw)
    assert torch.equal(a, b)


def test_unconstrained_decoding_can_leave_the_corpus(vm):
    codes = all_codes()[:2]                                   # a tiny corpus: the free model rarely hits it
    trie = token_trie(vm, codes)
    free = retrieve(vm, ["a red apple"], trie, num_beams=6, constrained=False)
    assert (free.tokens[0] >= 0).all()                        # it produced 6 full sequences ...
    assert (free.values[0] == -1).sum() >= 4                  # ... most of them not identifiers of the corpus
    bound = retrieve(vm, ["a red apple"], trie, num_beams=6)
    assert sorted(bound.values[0][:2].tolist()) == [0, 1] and (bound.values[0][2:] == -1).all()


# ---------------------------------------------------------------------- fast decoder == generate
def same_beams(fast, ref, atol: float = 1e-4) -> None:
    """Both decoders found the same identifiers with the same scores, ties aside.

    Scores must agree position by position. Within a run of tied scores any order is right, so there the
    identifier sets must agree; a tied run that reaches the last beam is skipped (which of the tied
    candidates made it into the beam is arbitrary)."""
    np.testing.assert_allclose(fast.scores, ref.scores, atol=atol, rtol=1e-5)
    for fv, rv, sc in zip(fast.values, ref.values, ref.scores):
        n, start = len(sc), 0
        while start < n:
            end = start + 1
            while end < n and (sc[end] == sc[start] or abs(sc[end] - sc[end - 1]) <= atol):
                end += 1
            if end < n or end - start == 1:
                assert set(fv[start:end]) == set(rv[start:end]), (fv, rv, sc)
            start = end


@st.composite
def decoding_cases(draw):
    codes = all_codes()
    rows = draw(st.lists(st.integers(0, len(codes) - 1), min_size=1, max_size=40, unique=True))
    caps = [" ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6))) for _ in range(draw(st.integers(1, 3)))]
    return codes[rows], caps, draw(st.integers(1, 12)), draw(st.integers(0, 10_000)), draw(st.booleans())


@settings(max_examples=30, deadline=None)
@given(decoding_cases())
def test_fast_decoder_returns_what_generate_returns(case):
    """Random tries, random weights (a fresh tiny model per seed), 1-12 beams: the same top-k and scores."""
    codes, caps, beams, seed, shared = case
    torch.set_num_threads(1)
    model = build_model(model_config(TINY, shared_vokens=shared, voken_init="random"), SIZES, seed=seed)
    model.model.eval()
    trie = token_trie(model, codes)
    fast = retrieve(model, caps, trie, num_beams=beams, decoder="fast", batch_size=2)
    ref = retrieve(model, caps, trie, num_beams=beams, decoder="generate", batch_size=2)
    same_beams(fast, ref)
    assert np.array_equal(fast.values >= 0, ref.values >= 0)


def test_fast_decoder_reads_cached_encoder_states(vm):
    from avg.model import EncoderCache

    trie = token_trie(vm, all_codes()[::2])
    caps = ["a red apple", "dog", "the small blue house tree lemon"]
    cache = EncoderCache(vm, caps + ["an unused caption"])
    fresh = retrieve(vm, caps, trie, num_beams=6)
    cached = retrieve(vm, caps, trie, num_beams=6, cache=cache)
    assert np.array_equal(fresh.values, cached.values)
    np.testing.assert_allclose(fresh.scores, cached.scores, atol=1e-5)


def test_unknown_decoder_is_refused(vm):
    with pytest.raises(ValueError, match="unknown decoder"):
        retrieve(vm, ["a dog"], token_trie(vm, all_codes()[:3]), num_beams=2, decoder="greedy")


@pytest.mark.parametrize("dec_hidden", [32, 48])   # 48: the encoder's 32-d states go through enc_to_dec_proj
def test_lean_decoder_steps_equal_the_models_own_forward(dec_hidden):
    """avg.lean_decoder (the small decoder's step without transformers' call machinery) == the model's forward."""
    from avg.decode import beam_search
    from avg.lean_decoder import supports

    cfg = {**TINY, "decoder_hidden": dec_hidden, "decoder_layers": 2, "decoder_ffn": 80}
    model = build_model(model_config(cfg, shared_vokens=False, voken_init="random"), SIZES, seed=11)
    model.model.eval()
    assert supports(model.model)
    trie = token_trie(model, all_codes()[::2])
    with torch.inference_mode():
        hidden, mask = model.encode_states(model.tokenize(["a red apple", "the small dog near a blue house tree"]))
        lean = beam_search(model, hidden, mask, trie, 7, lean=True)
        full = beam_search(model, hidden, mask, trie, 7, lean=False)
    assert torch.equal(lean[2], full[2])
    torch.testing.assert_close(lean[1], full[1], rtol=1e-5, atol=1e-5)


def test_lean_encoder_equals_the_models_own_encoder(vm):
    from avg.lean_decoder import encode, supports_encoder

    assert supports_encoder(vm.model)
    enc = vm.tokenize(["a red apple", "the small dog near a blue house tree", "lemon"])   # padded rows
    with torch.inference_mode():
        ours = encode(vm.model, enc["input_ids"], enc["attention_mask"])
        theirs = vm.encode_states(enc)[0]
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)   # padding positions are never read


def _ensemble_brute(members, captions, codes) -> np.ndarray:
    """[n, len(codes)] score of every identifier under the ensemble's rule, by teacher forcing: at every
    position the log-softmax of the members' mean log-probabilities, summed over the identifier."""
    cands = torch.as_tensor(members[0].spec.codes_to_tokens(codes))
    out = np.zeros((len(captions), len(codes)))
    with torch.no_grad():
        for i, c in enumerate(captions):
            logps = []
            for m in members:
                enc = m.tokenize([c] * len(codes))
                logps.append(torch.log_softmax(m.token_logits(enc, cands).float(), -1))
            mixed = torch.log_softmax(torch.stack(logps).mean(0), -1)
            out[i] = mixed.gather(-1, cands[..., None]).squeeze(-1).sum(-1).numpy()
    return out


def test_an_ensemble_of_one_model_with_itself_decodes_as_that_model(vm):
    from avg.decode import Ensemble

    trie = token_trie(vm, all_codes()[::2])
    caps = ["a red apple", "dog", "the small blue house"]
    alone = retrieve(vm, caps, trie, num_beams=6)
    twice = retrieve(Ensemble([vm, vm]), caps, trie, num_beams=6)
    assert np.array_equal(alone.values, twice.values)
    np.testing.assert_allclose(alone.scores, twice.scores, atol=1e-5)


def test_an_ensemble_ranks_by_the_mean_of_its_members_log_probabilities():
    """Two differently seeded models, beams covering the corpus: the ensemble's order and scores are the
    brute-force ones of the averaged distribution, and differ from either member's own ranking."""
    from avg.decode import Ensemble

    torch.set_num_threads(1)
    members = [build_model(model_config(TINY, shared_vokens=False, voken_init="random"), SIZES, seed=s) for s in (11, 12)]
    for m in members:
        m.model.eval()
    rng = np.random.default_rng(1)
    codes = all_codes()[rng.choice(len(all_codes()), 15, replace=False)]
    trie = token_trie(members[0], codes)
    caps = ["a red apple", "the small dog", "lemon tree house"]
    res = retrieve(Ensemble(members), caps, trie, num_beams=15)
    brute = _ensemble_brute(members, caps, codes)
    for i in range(len(caps)):
        assert np.array_equal(res.values[i], np.argsort(-brute[i], kind="stable"))
        np.testing.assert_allclose(res.scores[i], np.sort(brute[i])[::-1], rtol=1e-4, atol=1e-4)
    singles = [retrieve(m, caps, trie, num_beams=15).values for m in members]
    assert all(not np.array_equal(res.values, s) for s in singles)


def test_an_ensemble_over_other_identifiers_is_refused(vm):
    from avg.decode import Ensemble

    other = build_model(model_config(TINY, shared_vokens=False, voken_init="random"), [5, 4, 7], seed=3)
    with pytest.raises(ValueError, match="share the identifier table"):
        Ensemble([vm, other])
