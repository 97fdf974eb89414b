"""A CPU-quick share of the fault harness (benchmarks/faults.py, `fastssl-bench faults`): one trial of each
process scenario against the real fastssl-train command. The whole harness (10 trials each, 2 ranks, every
backend, every kind of damage) runs with --runslow and is what benchmarks/RESULTS.md reports."""
import random

import pytest

from benchmarks import faults
from benchmarks.fault_harness import Harness, same_run


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return Harness(tmp_path_factory.mktemp("faults"), random.Random(0))


def _passed(result):
    assert result.trials >= 1 and result.passed == result.trials, result.failures


def test_kill9_at_a_random_step_then_the_same_command_ends_as_an_uninterrupted_run(harness):
    _passed(faults.kill9(harness, 1))


def test_kill9_inside_a_save_keeps_the_previous_checkpoint_and_resumes_from_it(harness):
    _passed(faults.kill_in_save(harness, 1))


def test_a_full_disk_is_one_error_line_and_loses_nothing(harness):
    _passed(faults.full_disk(harness, 1))


def test_sigterm_checkpoints_exits_0_and_resumes_exactly(harness):
    _passed(faults.sigterm(harness, 1))


def test_images_replaced_mid_run_are_counted_skips_for_dali(harness):
    result = faults.unreadable(harness, 1, backends=("dali",))
    _passed(result)
    assert result.figures["skipped"]["dali"][0] > 0


def test_a_dying_rank_ends_the_job_in_time_and_leaves_no_process(harness):
    _passed(faults.dying_rank(harness, 1))


def test_the_harness_fails_a_run_that_is_not_the_reference(harness, tmp_path):
    # same_run compares every logged loss: a run of another seed is caught.
    reference = harness.reference()
    other = harness.fresh("other_seed")
    assert harness.run(harness.command(other, "config.SEED_VALUE=1")).status == 0
    assert "losses differ" in same_run(other, reference)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["damaged", "kill9_2ranks", "unreadable"])
def test_slow_scenarios(harness, scenario):
    _passed(faults.SCENARIOS[scenario](harness, 2, 40))
