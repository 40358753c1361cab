"""The README's results table is written from the committed report's metrics.json, never typed by hand."""
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))


def test_readme_table_is_the_committed_reports_numbers(tmp_path):
    """Against the report as committed (HEAD): a local `make demo` rewrites reports/ with new timings, and
    that must not fail `make test`; a clean clone (CI) has HEAD's files anyway."""
    metrics = REPO / "reports" / "tuxpaint" / "metrics.json"
    committed = subprocess.run(["git", "show", "HEAD:reports/tuxpaint/metrics.json"], cwd=REPO, capture_output=True)
    readme = subprocess.run(["git", "show", "HEAD:README.md"], cwd=REPO, capture_output=True)
    if committed.returncode == 0 and readme.returncode == 0:
        metrics = tmp_path / "metrics.json"
        metrics.write_bytes(committed.stdout)
        (tmp_path / "README.md").write_bytes(readme.stdout)
        readme_path = tmp_path / "README.md"
    else:                                            # not a git checkout: the files as they are
        readme_path = REPO / "README.md"
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "readme_results.py"), "--check",
                          "--metrics", str(metrics), "--readme", str(readme_path)], capture_output=True, text=True)
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
