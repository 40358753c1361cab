"""``avg search``: top-k images for a query; bad queries and missing files exit 2 with a message."""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from avg import safe_io, search  # noqa: E402
from avg.model import build_model  # noqa: E402
from helpers_configs import model_config  # noqa: E402

TINY = dict(encoder_init="random", shared_vokens=True, freeze_encoder=False, decoder_layers=1, decoder_hidden=32, decoder_heads=2, decoder_ffn=64,
            voken_init="random", encoder_overrides=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=64))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """data/<ds>/ with a (untrained, tiny) checkpoint and an identifier table: the default path layout."""
    root = tmp_path_factory.mktemp("data")
    ds = root / "toy"
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 5, size=(40, 3)), axis=0)[:12]
    table = pd.DataFrame({"image": [f"images/{i:02d}.png" for i in range(12)],
                          "split": ["train"] * 6 + ["val"] * 3 + ["test"] * 3,
                          "identifier": [" ".join(map(str, c)) for c in codes]})
    safe_io.write_csv(ds / "identifiers" / "avg.tsv", table, sep="\t")
    safe_io.write_json(ds / "identifiers" / "avg.json", {"position_sizes": [5, 5, 5]})
    build_model(model_config(TINY), [5, 5, 5]).save(ds / "checkpoints" / "avg")
    return root, table


def parse(argv):
    p = argparse.ArgumentParser()
    search.add_arguments(p)
    return p.parse_args(argv)


def test_json_output_lists_k_ranked_images_with_paths_and_identifiers(dataset, capsys):
    root, table = dataset
    rc = search.main(parse(["a yellow lemon", "--k", "5", "--dataset", "toy", "--data-root", str(root), "--json"]))
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == "a yellow lemon" and len(out["results"]) == 5
    by_image = dict(zip(table["image"], table["identifier"]))
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    for r in out["results"]:
        assert " ".join(map(str, r["identifier"])) == by_image[r["image"]]
        assert r["path"] == str(root / "toy" / "raw" / r["image"])
    assert len({r["image"] for r in out["results"]}) == 5


def test_split_restricts_the_searched_images_and_k_beyond_beams_is_served(dataset, capsys):
    root, _ = dataset
    rc = search.main(parse(["red circle", "--k", "12", "--beams", "2", "--data-root", str(root), "--dataset", "toy",
                            "--json"]))
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["results"]) == 12
    rc = search.main(parse(["red circle", "--k", "5", "--split", "test", "--data-root", str(root), "--dataset", "toy",
                            "--json"]))
    results = json.loads(capsys.readouterr().out)["results"]
    assert rc == 0 and len(results) == 3 and {r["split"] for r in results} == {"test"}


def test_several_checkpoints_search_as_one_ensemble(dataset, tmp_path, capsys):
    """--checkpoint a b: the scores are the ensemble's (mean log-probability per step), not either model's;
    a checkpoint of other identifiers is refused by name."""
    import torch

    root, table = dataset
    other = tmp_path / "other"
    vm = build_model(model_config(TINY), [5, 5, 5])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                  # another training's weights: the same shapes, other values
        for p in vm.model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    vm.save(other)
    first = root / "toy" / "checkpoints" / "avg"
    def run(*ckpts):
        rc = search.main(parse(["red circle", "--k", "12", "--data-root", str(root), "--dataset", "toy", "--json",
                                "--checkpoint", *map(str, ckpts)]))
        assert rc == 0
        return {r["image"]: r["score"] for r in json.loads(capsys.readouterr().out)["results"]}
    a, b, both = run(first), run(other), run(first, other)
    assert set(both) == set(a) == set(table["image"])          # k = the whole corpus: every image, each scored once
    # a model with itself is that model; two different models give the ensemble's own scores, lying between
    # theirs on the whole (the exact per-step arithmetic: tests/test_decode.py)
    same = run(first, first)
    assert all(abs(same[im] - a[im]) < 1e-4 for im in a)
    assert any(abs(a[im] - b[im]) > 1e-3 for im in a)
    assert any(abs(both[im] - a[im]) > 1e-3 for im in a) and any(abs(both[im] - b[im]) > 1e-3 for im in a)
    build_model(model_config(TINY), [5, 5, 6]).save(tmp_path / "wrong")
    rc = search.main(parse(["red circle", "--data-root", str(root), "--dataset", "toy",
                            "--checkpoint", str(first), str(tmp_path / "wrong")]))
    assert rc == 2 and "share the identifier table" in capsys.readouterr().err


def test_plain_output_through_the_cli(dataset, capsys):
    from avg import cli

    root, _ = dataset
    rc = cli.main(["search", "a blue square", "--k", "3", "--data-root", str(root), "--dataset", "toy"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("top 3 for 'a blue square'") and out.count("images/") == 3


@pytest.mark.parametrize("query, message", [
    ("", "empty"),
    ("   \t ", "empty"),
    ("x" * 1001, "too long"),
    ("?!... ---", "no letters or digits"),
    ("a red\x00apple", "control characters"),
    ("caf\udce9 au lait", "not valid text"),          # what argv holds for bytes that are not UTF-8
])
def test_bad_queries_exit_2_with_a_message(dataset, capsys, query, message):
    root, _ = dataset
    rc = search.main(parse([query, "--data-root", str(root), "--dataset", "toy"]))
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("avg search: error:")


def test_non_text_query_object_is_rejected():
    with pytest.raises(search.QueryError, match="must be text"):
        search.check_query(b"bytes")


@pytest.mark.parametrize("argv, message", [
    (["--k", "0"], "--k must be at least 1"),
    (["--checkpoint", "/nonexistent/ckpt"], "no trained checkpoint"),
    (["--identifiers", "/nonexistent/x.tsv"], "no identifier table"),
    (["--split", "dev"], "--split must be"),
])
def test_bad_options_and_missing_files_exit_2(dataset, capsys, argv, message):
    root, _ = dataset
    rc = search.main(parse(["a red apple", "--data-root", str(root), "--dataset", "toy", *argv]))
    assert rc == 2 and message in capsys.readouterr().err


def test_identifier_table_of_another_scheme_is_refused(dataset, tmp_path, capsys):
    root, table = dataset
    other = tmp_path / "other.tsv"
    safe_io.write_csv(other, table.assign(identifier=["1 2"] * len(table)), sep="\t")
    rc = search.main(parse(["a red apple", "--data-root", str(root), "--dataset", "toy", "--identifiers", str(other)]))
    assert rc == 2 and "length" in capsys.readouterr().err


def test_rerank_orders_candidates_by_the_feature_store(dataset, tmp_path, capsys):
    """--rerank N: the top N beams reordered by query · image in the store; the query embedded like its captions."""
    from avg import featurestore
    from avg.encoders.offline import OfflineEncoder

    root, table = dataset
    rng = np.random.default_rng(1)
    img = rng.standard_normal((12, 384)).astype(np.float32)
    img[7] = OfflineEncoder(progress=False).encode_texts(["a yellow lemon"])[0] * 3    # the one that matches
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    caps = pd.DataFrame({"caption_id": range(12), "image": table["image"], "caption": "x", "split": table["split"],
                         "image_index": range(12)})
    order = rng.permutation(12)              # the store's row order need not be the identifier table's
    store = featurestore.Features(img[order], table[["image", "split"]].iloc[order].reset_index(drop=True),
                                  img[order], caps.iloc[order].reset_index(drop=True).assign(image_index=range(12)),
                                  {"encoder": "offline", "alignment": {"chosen": "bridge"}})
    featurestore.save(tmp_path / "features", store)
    argv = ["a yellow lemon", "--k", "3", "--dataset", "toy", "--data-root", str(root), "--json", "--rerank", "12",
            "--features", str(tmp_path / "features")]
    assert search.main(parse(argv)) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert [r["rank"] for r in res] == [1, 2, 3] and res[0]["image"] == table["image"][7]
    assert res[0]["rerank_score"] > 0.99
    assert [r["rerank_score"] for r in res] == sorted((r["rerank_score"] for r in res), reverse=True)
    assert search.main(parse(argv[:-1] + [str(tmp_path / "nowhere")])) == 2
    assert "--rerank needs the feature store" in capsys.readouterr().err


def test_checkpoint_names_search_their_schemes_identifiers(dataset, capsys):
    root, table = dataset
    ds = root / "toy" / "checkpoints"
    import shutil

    if not (ds / "avg-ix-pq").exists():
        shutil.copytree(ds / "avg", ds / "avg-ix-pq")
        safe_io.write_json(ds / "avg-ix-pq" / "train.json", {"scheme": "avg", "recipe": "avg-ix-pq"})   # as avg train writes
    assert search.main(parse(["a red boat", "--scheme", "avg-ix-pq", "--dataset", "toy", "--data-root", str(root),
                              "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["identifiers"].endswith("identifiers/avg.tsv") and out["checkpoint"].endswith("checkpoints/avg-ix-pq")


def test_a_checkpoint_that_reads_the_embedding_gets_the_query_embedded_like_the_captions(dataset, tmp_path, capsys):
    """reads=embedding: the decoder sees only the query's embedding, made by the store's own encoder."""
    from avg import featurestore
    from avg.decode import retrieve, token_trie
    from avg.encoders.offline import OfflineEncoder
    from avg.metrics import l2_normalise

    root, table = dataset
    img = l2_normalise(np.random.default_rng(2).standard_normal((12, 384)).astype(np.float32))
    caps = pd.DataFrame({"caption_id": range(12), "image": table["image"], "caption": "x", "split": table["split"],
                         "image_index": range(12)})
    featurestore.save(tmp_path / "features", featurestore.Features(img, table[["image", "split"]], img, caps,
                                                                   {"encoder": "offline", "alignment": {"chosen": "bridge"}}))
    vm = build_model(model_config(TINY, reads="embedding", query_dim=384), [5, 5, 5], seed=4)
    vm.save(tmp_path / "emb")
    argv = ["a yellow lemon", "--k", "4", "--dataset", "toy", "--data-root", str(root), "--json",
            "--checkpoint", str(tmp_path / "emb"), "--features", str(tmp_path / "features")]
    assert search.main(parse(argv)) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    codes = np.array([[int(c) for c in s.split()] for s in table["identifier"]])
    q = l2_normalise(OfflineEncoder(progress=False).encode_texts(["a yellow lemon"]))
    vm.model.eval()
    want = retrieve(vm, ["a yellow lemon"], token_trie(vm, codes), num_beams=10, k=4, queries=q)
    assert [r["image"] for r in got] == [table["image"][i] for i in want.values[0]]
    assert search.main(parse(argv[:-1] + [str(tmp_path / "nowhere")])) == 2
    assert "reads the query embedding" in capsys.readouterr().err


def test_broken_checkpoints_and_wrong_paths_exit_2_naming_the_file(dataset, tmp_path, capsys):
    """Issue 15 (11): a truncated checkpoint, a corrupt avg_vokens.json, a folder as --identifiers: messages, not tracebacks."""
    import shutil

    root, _ = dataset
    base = ["a red boat", "--dataset", "toy", "--data-root", str(root)]
    assert search.main(parse(base + ["--identifiers", str(root / "toy" / "identifiers")])) == 2
    assert "is a folder, not an identifier table" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(root / "toy" / "checkpoints" / "avg", broken)
    (broken / "avg_vokens.json").write_text("{not json")
    assert search.main(parse(base + ["--checkpoint", str(broken)])) == 2
    err = capsys.readouterr().err
    assert "avg_vokens.json is corrupt" in err and "rerun `avg train`" in err
    shutil.copy(root / "toy" / "checkpoints" / "avg" / "avg_vokens.json", broken / "avg_vokens.json")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert search.main(parse(base + ["--checkpoint", str(broken)])) == 2
    err = capsys.readouterr().err
    assert "model weights could not be read" in err and str(broken) in err
