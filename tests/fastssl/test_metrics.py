"""Run logging (fastssl/metrics.py): metrics.jsonl is fastssl's own file, and a link planted at its name (or at
its temporary file's) is never followed."""
import json

import pytest

from fastssl.metrics import RunLogger


def _logger(directory, start_step=0):
    return RunLogger(directory=directory, enabled=True, use_tensorboard=False, progress_bar=False, total_steps=4,
                     start_step=start_step)


def test_a_link_planted_as_metrics_jsonl_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "users_notes.txt"
    target.write_text("mine\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(target)
    for start_step in (0, 5):
        with pytest.raises(ValueError, match="symbolic link"):
            _logger(run, start_step)
    assert target.read_text() == "mine\n"


def test_a_link_planted_as_the_temporary_file_of_a_resume_is_not_followed(tmp_path):
    target = tmp_path / "users_notes.txt"
    target.write_text("mine\n")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": step}) + "\n" for step in range(4)))
    (tmp_path / "metrics.jsonl.tmp").symlink_to(target)
    logger = _logger(tmp_path, start_step=2)  # drops the records of steps 2 and 3 through a temporary file
    logger.close()
    assert target.read_text() == "mine\n"
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]
