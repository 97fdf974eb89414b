"""A CPU-quick share of the data attacks (benchmarks/attacks_data.py, issue 23): the real fastssl-train
command against a crafted input, judged as the harness judges it. The whole list runs with
`python -m benchmarks.attacks_data`, whose figures are in benchmarks/RESULTS.md."""
import pytest

pytest.importorskip("ffcv", reason="ffcv is not installed (pip install fastssl[ffcv])")

from benchmarks import attacks_data  # noqa: E402

BY_NAME = {scenario.__name__: scenario for scenario in attacks_data.SCENARIOS}


@pytest.mark.parametrize("name", ["beton_raw_records_claim_1x1", "num_epochs_1e8"])
def test_an_attack_is_refused_in_one_line_within_bounded_memory(name, tmp_path):
    """The .beton case aborted the process (`corrupted double-linked list`); num_epochs=1e8 built its schedule
    for minutes."""
    outcome = BY_NAME[name](tmp_path)
    assert outcome["outcome"] == "refused", outcome
    assert outcome["peak_rss_mb"] < 3000, outcome


def test_every_scenario_reports_the_harness_fields():
    assert len(BY_NAME) == len(attacks_data.SCENARIOS) >= 14
    assert {"beton_random_bytes", "beton_planted_in_cache", "folder_symlink_loop", "image_decompression_bomb",
            "sigterm_during_set_up"} <= set(BY_NAME)
