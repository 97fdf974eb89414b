"""A CPU-quick share of the attack harness (benchmarks/attacks.py, `fastssl-bench attacks`): the real commands
against crafted input. The whole harness runs with --runslow and is what benchmarks/RESULTS.md reports."""
import sys
import types

import pytest

from benchmarks import attacks


def _not_failed(row):
    assert row["outcome"] in ("refused", "skipped", "ok") and row["peak_rss_mb"] < 4000, row


def test_a_module_planted_in_the_working_directory_of_a_2_rank_run_is_not_imported(tmp_path):
    row = attacks.run_scenario(attacks.planted_module, tmp_path)
    assert row["outcome"] == "ok", row
    assert not (tmp_path / "planted_module" / "PLANTED_RAN").exists()


def test_an_error_inside_a_dataloader_worker_is_one_line_not_a_hang(tmp_path):
    row = attacks.run_scenario(attacks.worker_error, tmp_path)
    _not_failed(row)
    assert row["outcome"] == "refused" and row["seconds"] < attacks.LIMITS["timeout_s"]


def test_a_link_planted_as_metrics_jsonl_is_refused_and_its_target_intact(tmp_path):
    _not_failed(attacks.run_scenario(attacks.metrics_symlink, tmp_path))


def test_the_harness_fails_a_traceback_and_a_second_error_line():
    traceback = attacks.Ran(2, "", "Traceback (most recent call last):\nfastssl-train: error: x\n", 1.0, 10.0)
    two_lines = attacks.Ran(2, "", "fastssl-train: error: x\nfastssl-train: error: y\n", 1.0, 10.0)
    hang = attacks.Ran(124, "", "fastssl-train: error: x\n", 300.0, 10.0)
    assert attacks.refusal(attacks.Ran(2, "", "fastssl-train: error: x\n", 1.0, 10.0)) == "fastssl-train: error: x"
    assert not any(attacks.refusal(ran) for ran in (traceback, two_lines, hang))
    assert attacks.refused_or_failed("x", traceback)["outcome"] == "FAILED"


def test_the_harness_also_runs_the_data_scenarios_when_their_module_exists(monkeypatch, tmp_path, capsys):
    def crafted_beton(workdir):
        return {"name": "crafted_beton", "outcome": "refused", "detail": "one line", "peak_rss_mb": 1.0}

    monkeypatch.setitem(sys.modules, "benchmarks.attacks_data", types.SimpleNamespace(SCENARIOS=[crafted_beton]))
    monkeypatch.setattr(attacks, "SCENARIOS", [])
    assert attacks.main(["--workdir", str(tmp_path)]) == 0
    assert "crafted_beton                refused" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [s.__name__ for s in attacks.SCENARIOS])
def test_every_attack(tmp_path, scenario):
    _not_failed(attacks.run_scenario(getattr(attacks, scenario), tmp_path))
