"""The token-to-voken model: voken mapping, codebook init, save/load, and the real T5 path on a tiny local T5."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from avg.decode import retrieve, token_trie  # noqa: E402
from helpers_configs import model_config  # noqa: E402
from avg.model import VokenModel, VokenSpec, build_model, default_encoder_path, voken_init_vectors  # noqa: E402

TINY = dict(encoder_init="random", shared_vokens=True, freeze_encoder=False, decoder_layers=1, decoder_hidden=32, decoder_heads=2, decoder_ffn=64,
            encoder_overrides=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))


def test_codes_and_tokens_round_trip_shared_and_per_level():
    codes = np.array([[0, 3, 1], [2, 0, 4]])
    shared = VokenSpec([4, 4, 5], shared=True, first_id=3)
    per = VokenSpec([4, 4, 5], shared=False, first_id=3)
    assert shared.n_vokens == 5 and per.n_vokens == 13
    assert shared.codes_to_tokens(codes).tolist() == [[3, 6, 4], [5, 3, 7]]
    assert per.codes_to_tokens(codes).tolist() == [[3, 10, 12], [5, 7, 15]]
    for spec in (shared, per):
        assert np.array_equal(spec.tokens_to_codes(spec.codes_to_tokens(codes)), codes)
    with pytest.raises(ValueError):
        per.codes_to_tokens(np.array([[4, 0, 0]]))          # code beyond its position's size


def test_codebook_init_keeps_the_codebook_geometry():
    rng = np.random.default_rng(0)
    cb = rng.standard_normal((2, 8, 16)).astype(np.float32)
    spec = VokenSpec([8, 8], shared=False, first_id=0)
    for dim in (16, 48):                                        # same width and wider: an isometry
        v = voken_init_vectors(cb, spec, dim).astype(np.float64)
        flat = cb.reshape(16, 16).astype(np.float64)
        np.testing.assert_allclose(v @ v.T, flat @ flat.T, atol=1e-3)
    narrow = voken_init_vectors(cb, spec, 8)                    # narrower: PCA keeps the main directions
    assert narrow.shape == (16, 8) and np.isfinite(narrow).all()
    shared = voken_init_vectors(cb, VokenSpec([8, 8, 3], shared=True, first_id=0), 16)
    np.testing.assert_allclose(shared, cb.mean(axis=0), atol=1e-5)   # shared voken = its code averaged over levels


def test_build_initialises_tied_voken_embeddings_from_the_codebook():
    rng = np.random.default_rng(1)
    cb = rng.standard_normal((3, 6, 32)).astype(np.float32)
    vm = build_model(model_config(TINY, shared_vokens=False), [6, 6, 6, 2], cb)
    dec = vm.model.get_decoder()
    emb = dec.get_input_embeddings().weight.detach().numpy()
    assert dec.get_output_embeddings().weight.data_ptr() == dec.get_input_embeddings().weight.data_ptr()
    rows = emb[vm.spec.first_id:vm.spec.first_id + 18]
    flat = cb.reshape(18, 32)
    corr = np.corrcoef((rows @ rows.T).ravel(), (flat @ flat.T).ravel())[0, 1]
    assert corr > 0.999                                         # same Gram matrix up to scale
    # the extra (collision) position has no codebook vectors: it keeps its random init
    assert np.abs(emb[vm.spec.first_id + 18:vm.spec.first_id + 20]).sum() > 0


def test_save_load_round_trip_gives_the_same_scores(tmp_path):
    vm = build_model(model_config(TINY, voken_init="random"), [4, 4], seed=5)
    vm.model.eval()
    codes = np.array([[0, 1], [2, 3], [3, 3]])
    trie = token_trie(vm, codes)
    before = retrieve(vm, ["a red apple", "a dog"], trie, num_beams=3)
    vm.save(tmp_path / "ckpt")
    loaded = VokenModel.load(tmp_path / "ckpt")
    after = retrieve(loaded, ["a red apple", "a dog"], trie, num_beams=3)
    assert loaded.spec == vm.spec and loaded.config == vm.config
    assert np.array_equal(before.values, after.values)
    np.testing.assert_allclose(before.scores, after.scores, rtol=1e-5)
    dec = loaded.model.get_decoder()
    assert dec.get_output_embeddings().weight.data_ptr() == dec.get_input_embeddings().weight.data_ptr()


def test_load_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="avg train"):
        VokenModel.load(tmp_path)


def test_freeze_encoder_leaves_only_the_decoder_trainable():
    vm = build_model(model_config(TINY, voken_init="random", freeze_encoder=True), [4, 4])
    assert not any(p.requires_grad for p in vm.model.get_encoder().parameters())
    assert all(p.requires_grad for p in vm.model.get_decoder().parameters())


def test_codebook_init_without_a_codebook_is_a_clear_error():
    with pytest.raises(ValueError, match="voken_init='random'"):
        build_model(model_config(TINY), [4, 4], codebook=None)


@pytest.fixture
def tiny_t5(tmp_path):
    """A tiny random T5 saved like a hub checkpoint (the tokenizer is the local MiniLM one: no hub)."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(default_encoder_path())
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                   decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    return tmp_path / "t5"


def test_t5_path_adds_vokens_and_decodes_constrained(tiny_t5, tmp_path):
    cb = np.random.default_rng(0).standard_normal((2, 6, 48)).astype(np.float32)
    vm = build_model(model_config(backbone="t5", encoder=str(tiny_t5), shared_vokens=True), [6, 6, 3], cb)
    n_text = 30522
    assert vm.spec.first_id == n_text and vm.vocab_size == n_text + 6
    assert vm.tokenizer.convert_ids_to_tokens(n_text + 5) == "<v_5>"
    emb = vm.model.get_input_embeddings().weight.detach().numpy()[n_text:]
    flat = cb.mean(axis=0)
    assert np.corrcoef((emb @ emb.T).ravel(), (flat @ flat.T).ravel())[0, 1] > 0.95   # PCA 48 -> 32 keeps most
    codes = np.array([[0, 1, 2], [3, 4, 0], [5, 5, 1]])
    trie = token_trie(vm, codes)
    res = retrieve(vm, ["a red apple"], trie, num_beams=4)
    assert sorted(res.values[0][:3].tolist()) == [0, 1, 2] and res.values[0][3] == -1
    vm.save(tmp_path / "ckpt")
    again = retrieve(VokenModel.load(tmp_path / "ckpt"), ["a red apple"], trie, num_beams=4)
    assert np.array_equal(res.values, again.values)


def test_t5_fast_decoder_returns_what_generate_returns(tiny_t5):
    """The own beam search on T5 (its past key values, relative position bias) against generate, ties aside."""
    from test_decode import same_beams

    rng = np.random.default_rng(1)
    allc = np.stack(np.meshgrid(*[np.arange(k) for k in (6, 6, 3)], indexing="ij"), -1).reshape(-1, 3)
    for shared in (True, False):
        vm = build_model(model_config(backbone="t5", encoder=str(tiny_t5), shared_vokens=shared, voken_init="random"),
                         [6, 6, 3], seed=2)
        with torch.no_grad():   # distinct voken rows: a random tiny T5's new tokens are near copies, i.e. all ties
            w = vm.model.lm_head.weight
            w[vm.spec.first_id:] = torch.randn(w[vm.spec.first_id:].shape, generator=torch.Generator().manual_seed(5)) * 2
        vm.model.eval()
        for _ in range(6):
            codes = allc[rng.choice(len(allc), int(rng.integers(2, 40)), replace=False)]
            trie = token_trie(vm, codes)
            beams = int(rng.integers(1, 12))
            caps = ["a red apple", "the dog is small"]
            same_beams(retrieve(vm, caps, trie, num_beams=beams), retrieve(vm, caps, trie, num_beams=beams, decoder="generate"))


def test_t5_frozen_encoder_keeps_the_shared_voken_embeddings_trainable(tiny_t5):
    """T5 ties encoder, decoder and head embeddings: freezing the encoder must not freeze the vokens."""
    vm = build_model(model_config(backbone="t5", encoder=str(tiny_t5), freeze_encoder=True, voken_init="random"), [6, 6, 3])
    assert vm.model.shared.weight.requires_grad
    enc_only = [p for n, p in vm.model.get_encoder().named_parameters() if "embed_tokens" not in n]
    assert enc_only and not any(p.requires_grad for p in enc_only)


def test_t5_reads_the_query_embedding_and_keeps_it_through_a_checkpoint(tiny_t5, tmp_path):
    """Query conditioning on the paper's backbone: the prefix has T5's width, both decoders agree, and
    the checkpoint keeps the projection (issue 12: both backbones)."""
    from test_decode import same_beams

    vm = build_model(model_config(backbone="t5", encoder=str(tiny_t5), voken_init="random", reads="both",
                                 prefix_tokens=2, query_dim=5), [6, 6, 3], seed=3)
    with torch.no_grad():
        w = vm.model.lm_head.weight
        w[vm.spec.first_id:] = torch.randn(w[vm.spec.first_id:].shape, generator=torch.Generator().manual_seed(5)) * 2
    vm.model.eval()
    assert vm.prefix.proj.out_features == 2 * 32                    # prefix_tokens x d_model
    allc = np.stack(np.meshgrid(*[np.arange(k) for k in (6, 6, 3)], indexing="ij"), -1).reshape(-1, 3)
    trie = token_trie(vm, allc[::4])
    q = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    caps = ["a red apple", "the dog is small"]
    fast = retrieve(vm, caps, trie, num_beams=5, queries=q)
    same_beams(fast, retrieve(vm, caps, trie, num_beams=5, decoder="generate", queries=q))
    assert not np.allclose(fast.scores, retrieve(vm, caps, trie, num_beams=5, queries=-q).scores)
    vm.save(tmp_path / "ckpt")
    back = VokenModel.load(tmp_path / "ckpt")
    np.testing.assert_allclose(retrieve(back, caps, trie, num_beams=5, queries=q).scores, fast.scores, atol=1e-5)


def test_minilm_backbone_loads_any_text_encoder_through_automodel(tmp_path):
    """train.model.encoder may name a non-BERT encoder (here a tiny DistilBERT): it loads through AutoModel, trains
    a step, and its checkpoint decodes the same after a reload (the lean encoder path is BERT-only and steps aside)."""
    from transformers import DistilBertConfig, DistilBertModel

    from avg import lean_decoder
    from tests.helpers_tiny_models import make_tiny_clip_tokenizer

    folder = tmp_path / "distilbert"
    tok = make_tiny_clip_tokenizer(32)
    DistilBertModel(DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=40, pad_token_id=tok.pad_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = model_config(TINY, {"encoder_init": "pretrained", "encoder_overrides": {}}, encoder=str(folder),
                      voken_init="random")
    vm = build_model(cfg, [4, 4], seed=1)
    assert type(vm.model.encoder).__name__ == "DistilBertModel" and not lean_decoder.supports_encoder(vm.model)
    codes = np.array([[0, 1], [2, 3], [3, 3], [1, 0]])
    trie = token_trie(vm, codes)
    vm.model.train()
    batch = vm.tokenizer(["a red apple", "a dog"], padding=True, return_tensors="pt")
    labels = torch.as_tensor(vm.spec.codes_to_tokens(codes[:2]))
    loss = vm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and vm.model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    vm.model.eval()
    before = retrieve(vm, ["a red apple", "a dog"], trie, num_beams=3)
    vm.save(tmp_path / "ckpt")
    after = retrieve(VokenModel.load(tmp_path / "ckpt"), ["a red apple", "a dog"], trie, num_beams=3)
    assert np.array_equal(before.values, after.values)
    np.testing.assert_allclose(before.scores, after.scores, rtol=1e-5)
