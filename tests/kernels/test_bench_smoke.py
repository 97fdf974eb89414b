import json

from benchmarks.kernels import main


def test_quick_kernel_benchmark_prints_a_table_and_a_json_record(capsys):
    record = main(["--quick", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["case", "size"]
    printed = json.loads(lines[-1])
    assert printed == json.loads(json.dumps(record))
    assert printed["benchmark"] == "kernels" and "--quick" in printed["command"]
    assert set(printed["machine"]) >= {"platform", "cpu_count", "torch", "device_name"}
    assert {row["case"] for row in printed["results"]} == {"npid_step", "kmeans", "kmeans_m_step"}
    for row in printed["results"]:
        assert row["fast_s"] > 0 and row["baseline_s"] > 0
        assert abs(row["speedup"] - row["baseline_s"] / row["fast_s"]) < 1e-9
