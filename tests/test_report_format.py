"""The spread and flag cells the bench tables and the README's generated tables share (avg.report.format)."""
from avg.report.format import fmt_mean_sd, fmt_yes_no


def test_a_spread_cell_shows_the_sd_only_when_there_is_one_and_marks_a_missing_mean():
    assert fmt_mean_sd(0.5632, 0.0987, 2) == "0.56 ± 0.10"
    assert fmt_mean_sd(24.64, None, 1) == "24.6"          # one split: no sd to show
    assert fmt_mean_sd(None, 0.1, 2) == "—"
    assert fmt_mean_sd(None, None, 2, "n/a") == "n/a"


def test_a_flag_cell_says_yes_no_or_that_it_is_unknown():
    assert (fmt_yes_no(True), fmt_yes_no(False)) == ("yes", "no")
    assert fmt_yes_no(None) == "—" and fmt_yes_no(None, "not run") == "not run"
