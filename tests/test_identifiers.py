"""Identifier schemes, collision resolution, statistics and the identifiers step."""
from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from avg import featurestore, params
from avg import identifiers as ident
from avg.errors import UserError
from avg.params import ParamsError

REPO = Path(__file__).resolve().parents[1]


def ident_cfg(**over) -> dict:
    cfg = yaml.safe_load((REPO / "params" / "identifiers.yaml").read_text())["identifiers"]
    cfg.update(over)
    return cfg


def write_store(root: Path, n: int = 60, d: int = 12, topics: int = 6, seed: int = 0) -> Path:
    """Images around topic directions, two captions each near the topic."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, d))
    t = np.arange(n) % topics
    norm = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
    img = norm(centres[t] + 0.5 * rng.standard_normal((n, d)))
    split = np.array(["train", "train", "train", "val", "test"])[np.arange(n) % 5]
    images = pd.DataFrame({"image": [f"img/{i:03d}.png" for i in range(n)], "split": split})
    rows, text = [], []
    for i in range(n):
        for j in range(2):
            rows.append((len(rows), images.image[i], f"topic {t[i]} caption {j}", split[i], i))
            text.append(centres[t[i]] + 0.2 * rng.standard_normal(d))
    caps = pd.DataFrame(rows, columns=["caption_id", "image", "caption", "split", "image_index"])
    featurestore.save(root, featurestore.Features(img, images, norm(np.asarray(text)), caps,
                                                  {"encoder": "toy", "sacred_run_id": "features/0"}))
    return root


# ---------------------------------------------------------------------- schemes


def test_atomic_codes_are_unique_seeded_and_of_the_asked_shape():
    a = ident.atomic_codes(200, 3, 8, seed=1)
    assert a.codes.shape == (200, 3) and a.sizes == [8, 8, 8]
    assert a.codes.min() >= 0 and a.codes.max() < 8
    assert len(np.unique(a.codes, axis=0)) == 200
    assert np.array_equal(a.codes, ident.atomic_codes(200, 3, 8, seed=1).codes)
    assert not np.array_equal(a.codes, ident.atomic_codes(200, 3, 8, seed=2).codes)
    big = ident.atomic_codes(50, 4, 1024, seed=0)       # 1024**4 sequences: drawn digit by digit
    assert len(np.unique(big.codes, axis=0)) == 50 and big.codes.max() < 1024
    with pytest.raises(ParamsError, match="identifiers.atomic"):
        ident.atomic_codes(100, 2, 8, seed=0)             # 64 sequences for 100 images


def test_kmeans_codes_follow_the_cluster_tree():
    rng = np.random.default_rng(0)
    centres = np.eye(6)[:3] * 5
    x = np.concatenate([c + 0.3 * rng.standard_normal((30, 6)) for c in centres]).astype(np.float32)
    sc = ident.kmeans_codes(x, levels=2, branching=3, iters=20, seed=0)
    assert sc.codes.shape == (90, 2) and sc.codes.max() < 3 and sc.sizes == [3, 3]
    assert all(len(np.unique(sc.codes[i * 30:(i + 1) * 30, 0])) == 1 for i in range(3))   # top level = the blobs
    assert np.array_equal(sc.codes, ident.kmeans_codes(x, 2, 3, 20, seed=0).codes)
    assert sc.codebook.shape == (2, 3, 6)
    # the codebook is a residual decomposition: the vectors along a path sum to (about) the leaf centre
    path_sum = sc.codebook[0][sc.codes[:, 0]] + sc.codebook[1][sc.codes[:, 1]]
    assert np.abs(path_sum - x).mean() < 0.5


# ---------------------------------------------------------------------- collisions


def colliding() -> ident.SchemeCodes:
    codes = np.array([[0, 1], [0, 1], [0, 1], [1, 0], [2, 2], [2, 2]])
    dist = np.tile(np.arange(3, dtype=np.float32), (6, 1))
    return ident.SchemeCodes(codes, [3, 3], rank_key=np.array([0.5, 0.1, 0.9, 0, 0.2, 0.3]), last_dist=dist)


def test_collision_stats_count_images_sharing_a_code():
    s = ident.collision_stats(colliding().codes)
    assert s["collisions_before"] == 5 and s["collision_rate_before"] == pytest.approx(5 / 6)
    assert s["max_group_before"] == 3 and s["distinct_codes_before"] == 3


def test_append_adds_the_rank_within_the_collision_group():
    ids, sizes = ident.resolve_collisions(colliding(), "append")
    assert ids.shape == (6, 3) and sizes == [3, 3, 3]
    assert len(np.unique(ids, axis=0)) == 6
    assert ids[:, 2].tolist() == [1, 0, 2, 0, 0, 1]        # closest to the shared code gets 0
    unique = ident.SchemeCodes(np.array([[0, 1], [1, 1]]), [2, 2])
    ids, sizes = ident.resolve_collisions(unique, "append")
    assert ids.shape == (2, 2) and sizes == [2, 2]           # nothing to resolve: no extra position


def test_reassign_keeps_the_length_and_moves_to_free_codes():
    sc = colliding()
    ids, sizes = ident.resolve_collisions(sc, "reassign")
    assert ids.shape == (6, 2) and sizes == [3, 3]
    assert len(np.unique(ids, axis=0)) == 6
    assert np.array_equal(ids[:, 0], sc.codes[:, 0])         # prefixes untouched
    assert ids[1].tolist() == [0, 1]                          # the group's closest image keeps its code
    crowded = ident.SchemeCodes(np.zeros((4, 2), np.int64), [3, 3])
    with pytest.raises(ParamsError, match="identifiers.collision_resolution"):
        ident.resolve_collisions(crowded, "reassign")


def test_semantic_check_matches_brute_force_over_pairs():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((25, 5))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    first = rng.integers(3, size=25)
    rows = np.arange(3, 25)
    got = ident.semantic_check(first, c, rows, "x")
    same = [c[i] @ c[j] for i, j in combinations(rows, 2) if first[i] == first[j]]
    diff = [c[i] @ c[j] for i, j in combinations(rows, 2) if first[i] != first[j]]
    assert got["pairs_same_first"] == len(same) and got["pairs_diff_first"] == len(diff)
    assert got["mean_sim_same_first"] == pytest.approx(np.mean(same))
    assert got["mean_sim_diff_first"] == pytest.approx(np.mean(diff))


def test_bad_params_and_unknown_scheme_name_the_file_and_key():
    with pytest.raises(ParamsError, match=r"identifiers\.collision_resolution"):
        params.validate("identifiers", ident_cfg(collision_resolution="drop"), "t")
    with pytest.raises(ParamsError, match=r"identifiers\.kmeans\.branching"):
        params.validate("identifiers", ident_cfg(kmeans={"levels": 2, "branching": 1, "iters": 5}), "t")
    params.validate("identifiers", ident_cfg(), "defaults")
    for name in ("flickr30k", "coco"):
        over = yaml.safe_load((REPO / "params" / "experiments" / f"{name}.yaml").read_text())["identifiers"]
        params.validate("identifiers", {**ident_cfg(), **over}, name)
    with pytest.raises(ParamsError, match="schemes"):     # the recipes (params/methods.yaml) name them now
        params.validate("identifiers", ident_cfg(schemes=["avg"]), "test")


# ---------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def store_and_tokenizers(tmp_path_factory):
    """A toy feature store and a briefly trained rq and avg tokenizer beside it."""
    import torch

    from avg.steps import tokenizer as tok_step

    root = tmp_path_factory.mktemp("ids")
    store = write_store(root / "features")
    cfg = yaml.safe_load((REPO / "params" / "tokenizer.yaml").read_text())["tokenizer"]
    cfg.update({"levels": 2, "codebook_size": 4, "latent_dim": 8, "hidden": [16], "epochs": 5, "batch_size": 16})
    n = torch.get_num_threads()
    for scheme in ("rq", "avg"):
        tok_step.run(cfg=cfg, log=lambda *a: None, run_id=f"tok/{scheme}", features=store, scheme=scheme,
                     out=root / "tokenizer" / scheme)
    torch.set_num_threads(n)
    return root, store


def run_step(root: Path, store: Path, scheme: str, out: str = "identifiers", **over) -> dict:
    from avg.steps import identifiers as step

    tokenizer = root / "tokenizer" / scheme if scheme in ("rq", "avg") else None
    cfg = ident_cfg(atomic={"levels": 2, "codebook_size": 8}, kmeans={"levels": 2, "branching": 4, "iters": 10}, **over)
    return step.run(cfg=cfg, log=lambda *a: None, run_id=f"identifiers/{scheme}", features=store, scheme=scheme,
                    tokenizer=tokenizer, out=root / out)


@pytest.mark.parametrize("scheme", ["atomic", "kmeans", "rq", "avg"])
def test_every_scheme_writes_a_valid_unique_table(store_and_tokenizers, scheme):
    from avg.trie import read_identifiers

    root, store = store_and_tokenizers
    run_step(root, store, scheme)
    table, codes, sizes, stats = read_identifiers(root / "identifiers" / f"{scheme}.tsv")
    feats = featurestore.load(store)
    assert table["image"].tolist() == feats.images["image"].tolist()          # every image, all splits, in order
    assert table["split"].tolist() == feats.images["split"].tolist()
    assert len(np.unique(codes, axis=0)) == len(codes)
    assert all(codes[:, p].max() < s for p, s in enumerate(sizes))
    assert stats["scheme"] == scheme and stats["sacred_run_id"] == f"identifiers/{scheme}"
    assert stats["unique_after"] == len(codes) and stats["length"] == codes.shape[1]
    for key in ("collisions_before", "collision_rate_before", "utilisation_per_level", "perplexity_per_level",
                "semantic_check", "semantic_check_all"):
        assert key in stats, key
    assert stats["semantic_check"]["images"].startswith("val+test")
    book = root / "identifiers" / f"{scheme}.codebook.npy"
    if scheme == "atomic":
        assert not book.exists() and stats["collisions_before"] == 0
    else:
        arr = np.load(book)
        assert arr.dtype == np.float32 and arr.ndim == 3 and arr.shape[0] == stats["levels"]
        assert arr.shape[1] == sizes[0]
    if scheme in ("rq", "avg"):
        assert -1 <= stats["recon_cosine"] <= 1 and stats["tokenizer_run_id"] == f"tok/{scheme}"


@pytest.mark.parametrize("scheme", ["atomic", "kmeans", "avg"])
def test_identifiers_are_deterministic_given_the_seed(store_and_tokenizers, scheme):
    root, store = store_and_tokenizers
    run_step(root, store, scheme, out="a")
    run_step(root, store, scheme, out="b")
    a = (root / "a" / f"{scheme}.tsv").read_text()
    assert a == (root / "b" / f"{scheme}.tsv").read_text()


def test_step_errors_are_clear(store_and_tokenizers, tmp_path):
    root, store = store_and_tokenizers
    with pytest.raises(ParamsError, match=r"--scheme: unknown scheme 'dsi'.*params/methods\.yaml"):
        run_step(root, store, "dsi")
    from avg.steps import identifiers as step

    with pytest.raises(UserError, match="needs --tokenizer"):
        step.run(cfg=ident_cfg(), log=lambda *a: None, run_id="r", features=store, scheme="avg", tokenizer=None,
                 out=tmp_path)
    with pytest.raises(UserError, match="holds the 'rq' tokenizer"):
        step.run(cfg=ident_cfg(), log=lambda *a: None, run_id="r", features=store, scheme="avg",
                 tokenizer=root / "tokenizer" / "rq", out=tmp_path)
