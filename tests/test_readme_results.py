"""The README's results tables are written from the committed report's metrics.json and the five-split
bench's split_spread.json, never typed by hand."""
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))


def test_readme_table_is_the_committed_reports_numbers(tmp_path):
    """Against the report as committed (HEAD): a local `make demo` rewrites reports/ with new timings, and
    that must not fail `make test`; a clean clone (CI) has HEAD's files anyway."""
    files = {"metrics": "reports/tuxpaint/metrics.json", "spread": "reports/bench/split_spread.json", "readme": "README.md"}
    shown = {k: subprocess.run(["git", "show", f"HEAD:{f}"], cwd=REPO, capture_output=True) for k, f in files.items()}
    if all(r.returncode == 0 for r in shown.values()):
        paths = {k: tmp_path / f.replace("/", "_") for k, f in files.items()}
        for k, p in paths.items():
            p.write_bytes(shown[k].stdout)
    else:                                            # not a git checkout: the files as they are
        paths = {k: REPO / f for k, f in files.items()}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "readme_results.py"), "--check",
                          "--metrics", str(paths["metrics"]), "--spread", str(paths["spread"]),
                          "--readme", str(paths["readme"])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_table_rows_carry_provenance_and_the_ratio_to_dense():
    import readme_results

    summary = {"dataset": "toy", "sacred_run_id": "report/3", "methods": {
        "dense": {"recall@1": 0.5, "recall@5": 0.8, "recall@10": 0.9, "median_rank": 1.0, "latency_ms_median": 0.02,
                  "latency_ms_p95": 0.03, "qps": 250000.0, "latency_ms_end_to_end_median": 6.5,
                  "latency_ms_end_to_end_p95": 9.25, "qps_end_to_end": 231.0, "learned_from": "train captions (features step)",
                  "ranking": "dense score"},
        "avg-ix-gen": {"recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.7, "median_rank": None, "latency_ms_median": 30.0,
                       "latency_ms_p95": 35.5, "qps": 90.2, "latency_ms_end_to_end_median": 30.0,
                       "latency_ms_end_to_end_p95": 35.5, "qps_end_to_end": 90.2, "train_seconds": 83.4,
                       "learned_from": "train captions + corpus images (indexing)",
                       "ranking": "generative (no dense score); reads caption + query embedding"}}}
    text = readme_results.render("a\n<!-- results:begin -->\nold\n<!-- results:end -->\nb\n", summary)
    assert text.startswith("a\n<!-- results:begin -->\n| method |") and text.endswith("<!-- results:end -->\nb\n")
    row = next(l for l in text.splitlines() if l.startswith("| `avg-ix-gen`"))
    assert "| train captions + corpus images (indexing) | generative (no dense score)" in row
    assert "| 25.0 | 0.50 | 50.0 | 70.0 | inf | 30.00 | 35.50 | 90 | 83 |" in row
    dense = next(l for l in text.splitlines() if l.startswith("| `dense`"))
    assert "| 6.50 | 9.25 | 231 |" in dense                        # end to end, not the search-only 0.02 ms
    assert "report run `report/3`" in text and "old" not in text


def test_spread_block_labels_rows_and_states_each_target():
    import readme_results

    spread = {"seeds": [0, 1], "methods": ["dense", "avg-ix-gen"],
              "summary": {"dense": {"recall@1_mean": 44.0, "recall@1_sd": 3.0, "ratio_r1_to_dense_mean": 1.0,
                                    "ratio_r1_to_dense_sd": 0.0},
                          "avg-ix-gen": {"recall@1_mean": 22.6, "recall@1_sd": 3.3, "ratio_r1_to_dense_mean": 0.51,
                                         "ratio_r1_to_dense_sd": 0.05}},
              "labels": {"dense": {"learned_from": "train captions (features step)", "dense_score": True},
                         "avg-ix-gen": {"learned_from": "train captions + corpus images (indexing)", "dense_score": False}},
              "targets": [{"group": "no dense score, no pseudo-queries", "best": "avg-ix-gen", "target": 0.6,
                           "ratio_mean": 0.51, "ratio_sd": 0.05, "met": False}]}
    base = "x\n<!-- results:begin -->\n<!-- results:end -->\ny\n<!-- spread:begin -->\nold\n<!-- spread:end -->\nz\n"
    text = readme_results.render(base, {"dataset": "toy", "methods": {}}, None, spread)
    assert "| `avg-ix-gen` | train captions + corpus images (indexing) | no | 22.6 ± 3.3 | 0.51 ± 0.05 |" in text
    assert "| no dense score, no pseudo-queries | `avg-ix-gen` | 0.51 ± 0.05 | 0.6 × | no |" in text
    assert "old" not in text and text.endswith("<!-- spread:end -->\nz\n")
