"""benchmarks/comm_volume.py: the counts come from the seed model and the table and JSON line print."""
import json

from benchmarks.comm_volume import all_gather, all_reduce, main


def test_ring_volumes_follow_the_formulas():
    assert all_reduce(1000.0, 1) == (0.0, 0.0)
    sent, seconds = all_reduce(8e6, 8)
    assert sent == 2 * 7 / 8 * 8e6 and seconds > sent / 450e9
    assert all_reduce(8e6, 64)[1] > all_reduce(8e6, 8)[1]  # across nodes: InfiniBand
    assert all_gather(100.0, 4)[0] == 300.0


def test_seed_swav_volumes_table_and_json(capsys):
    record = main(["--gpus", "8", "64"])
    out = capsys.readouterr().out
    assert "gradient all-reduce" in out and "scaling efficiency" in out
    assert json.loads(out.strip().splitlines()[-1])["benchmark"] == "comm_volume"
    rows = {r["collective"]: r for r in record["results"]}
    params = record["assumptions"]["parameters"]
    assert 28e6 < params < 29e6  # ResNet-50 trunk + 2048-2048-128 head + 3000 prototypes
    assert rows["gradient all-reduce (fp32)"]["mean_payload_bytes"] == 4 * params
    assert rows["SyncBN forward all-gather"]["calls_per_step"] == 53 * 2 + 1  # trunk BNs x 2 resolutions + head
    assert rows["Sinkhorn row sums + max"]["calls_per_step"] == 2 * 3 * 2
    assert record["scaling"]["8"]["efficiency"] > record["scaling"]["64"]["efficiency"] > 0.5
