"""The loader benchmark runs end to end at tiny sizes and reports one JSON line."""
from __future__ import annotations

import json

from benchmarks.loader import available_backends, main


def test_quick_benchmark_prints_a_table_and_a_json_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTSSL_CACHE", str(tmp_path))
    # FFCV's numba compilation alone takes longer than this smoke test may; test_contract runs it.
    backends = "baseline,dali" if "dali" in available_backends() else "baseline,torchvision"
    record = main(["--quick", "--workers", "1", "--backends", backends])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == record
    assert "images/s" in "\n".join(lines[:-1])
    figures = record["figures"]
    assert set(figures["images_per_s"]) == set(backends.split(","))
    assert all(value > 0 for value in figures["images_per_s"].values())
    assert figures["ratio_to_baseline"]["baseline"] == 1.0 and figures["crops"] == "2x32+6x16"
    assert record["command"].startswith("python -m benchmarks.loader --quick")
    assert {"cpus", "torch"} <= set(record["machine"]) and record["commit"]
