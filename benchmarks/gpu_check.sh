#!/usr/bin/env bash
# The GPU check in one call (about eight minutes on one H100/H200): every CUDA path of fastssl and the
# throughput benchmarks, each figure written as JSON into $OUT, then a summary table.
#
#   bash benchmarks/gpu_check.sh              # on a machine with NVIDIA GPUs, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run    # print what it would run (CI runs this)
#
# Steps (each bounded by `timeout`, a failed step does not stop the others; the exit status counts them):
#   1. set-up. With a folder .whl of wheels (a lent GPU machine with no registry: its image has torch but not
#      fastssl's other packages), they are installed into /tmp/site; otherwise `make setup`, then the GPU
#      build of FAISS replaces faiss-cpu (never both installed). Wheels for the lent machine (Python 3.12),
#      made here: echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all:
#      --python-version 3.12 --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.2 omegaconf==2.3.0
#      antlr4-python3-runtime==4.9.3   (DALI and FFCV are too large to carry: their tests then skip)
#   2. the CUDA tests: pytest -m gpu tests/gpu (DALI mixed decode, FFCV ToDevice, bf16/fp16 steps,
#      SyncBatchNorm over NCCL, torch.compile)
#   3. fastssl-bench loader on the GPU (every installed backend against the per-crop PIL baseline, 2x224 + 6x96)
#   4. fastssl-bench train at full size, batch 64 on one GPU, bf16, channels_last: SwAV (2x224 + 6x96,
#      compiled), DeepClusterV2, NPID (ResNet-50), on the fastest installed loader
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT=${OUT:-gpu_check_out}
if [ -d .whl ]; then PY=python3; export PYTHONPATH="$PWD:/tmp/site"; else PY=.venv/bin/python; fi
LOADER=torchvision
$PY -c "import nvidia.dali" 2>/dev/null && LOADER=dali
FAILED=0
SPEED=(config.DATA.TRAIN.LOADER=$LOADER config.MODEL.AMP_PARAMS.USE_AMP=True config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16
       config.MODEL.CHANNELS_LAST=True config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64
       config.DATA.NUM_DATALOADER_WORKERS=8 config.DISTRIBUTED.NUM_NODES=1 config.DISTRIBUTED.NUM_PROC_PER_NODE=1)

step() {  # step NAME SECONDS OUTPUT_FILE COMMAND...
  local name=$1 seconds=$2 output=$3
  shift 3
  echo "== $name (at most ${seconds}s): $*"
  [ "$DRY_RUN" = 1 ] && return 0
  if ! timeout "$seconds" "$@" > >(tee "$OUT/$output") 2>&1; then
    echo "== $name FAILED"
    FAILED=$((FAILED + 1))
  fi
}

[ "$DRY_RUN" = 1 ] || { mkdir -p "$OUT"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"; }
if [ -d .whl ]; then
  step setup 60 setup.log bash -c "python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl"
else
  step setup 240 setup.log bash -c "make setup >/dev/null && (.venv/bin/pip uninstall -y -q faiss-cpu; \
    .venv/bin/pip install -q faiss-gpu-cu12 || .venv/bin/pip install -q faiss-cpu)"
fi
step cuda-tests 120 cuda_tests.log $PY -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rs
step loader 45 loader.log $PY -m benchmarks.cli loader --device cuda --dtype bfloat16 --num-images 1000 --batches 10
step train-swav 150 train_swav.log $PY -m benchmarks.cli train --config pretrain/swav/swav_8node_resnet "${SPEED[@]}" \
  config.MODEL.TORCH_COMPILE=True
step train-deepclusterv2 60 train_deepclusterv2.log $PY -m benchmarks.cli train \
  --config pretrain/deepcluster_v2/deepclusterv2_2crops_resnet "${SPEED[@]}" \
  config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=320  # 3,200 images: every rank's memory holds 3,000 clusters
step train-npid 60 train_npid.log $PY -m benchmarks.cli train --config pretrain/npid/npid_8gpu_resnet "${SPEED[@]}"

[ "$DRY_RUN" = 1 ] && exit 0
# The summary: every JSON line the benchmarks printed, one row each.
grep -h '^{' "$OUT"/*.log > "$OUT/figures.jsonl"
$PY - "$OUT/figures.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    record = json.loads(line)
    figures = record.get("figures", record)
    if record.get("benchmark") == "train":
        print(f"train {figures['method']:<22} {figures['images_per_s']:>9.1f} img/s  data-wait "
              f"{figures['data_wait_share']:.1%}  bare {figures['bare_images_per_s']:.1f} img/s  "
              f"bf16 peak share {figures.get('share_of_bf16_peak') or 0:.1%}")
    else:
        print(record.get("benchmark", "loader"), json.dumps(figures)[:160])
EOF
echo "== $FAILED step(s) failed; figures in $OUT/figures.jsonl (commit $(git rev-parse --short HEAD))"
exit "$FAILED"
