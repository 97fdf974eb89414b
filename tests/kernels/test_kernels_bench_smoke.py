import json

import torch

from benchmarks.kernels import main


def test_quick_kernel_benchmark_prints_a_table_and_a_json_record(capsys):
    # One thread: two OpenMP threads on a busy 2-core machine can run 100x slower.
    threads = torch.get_num_threads()
    record = main(["--quick", "--device", "cpu", "--threads", "1"])
    assert torch.get_num_threads() == threads
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["case", "size"]
    printed = json.loads(lines[-1])
    assert printed == json.loads(json.dumps(record))
    assert printed["benchmark"] == "kernels" and "--quick" in printed["command"]
    assert set(printed["machine"]) >= {"platform", "cpu_count", "threads", "torch", "device_name"}
    assert printed["machine"]["threads"] == 1
    assert {row["case"] for row in printed["results"]} == {"npid_step", "kmeans", "kmeans_m_step"}
    for row in printed["results"]:
        assert row["fast_s"] > 0 and row["baseline_s"] > 0
        assert abs(row["speedup"] - row["baseline_s"] / row["fast_s"]) < 1e-9
