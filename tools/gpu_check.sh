#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the CUDA test tier and the GPU benchmarks, every figure
# written as JSON under OUT (default $OUT, else ./gpu_out), in well under 8 minutes on one H200.
#
#   here, once:   bash tools/gpu_wheels.sh          (fills .whl/ with what the machine lacks)
#   there:        bash tools/gpu_check.sh           (device call with carry: [".whl"])
#
# Each step has its own time limit and its log under OUT; a failing step is recorded in
# OUT/summary.json and the next one still runs, so one call yields every figure it can.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} DS_BUILD_OPS=0 OMP_NUM_THREADS=4
summary="$OUT/summary.json"
echo "{" >"$summary"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log it, record its status and time
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    printf '  "%s": {"rc": %d, "seconds": %d},\n' "$name" "$rc" $(($(date +%s) - start)) \
        >>"$summary"
    echo "$name: rc $rc ($(($(date +%s) - start)) s)"
}

step env 30 python3 -c "
import json, torch, deepspeed, webdataset, submitit
p = torch.cuda.get_device_properties(0)
print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,
                  'deepspeed': deepspeed.__version__, 'device': p.name,
                  'memory_gb': round(p.total_memory / 2**30, 1), 'sms': p.multi_processor_count}))"
cp "$OUT/env.log" "$OUT/env.json" 2>/dev/null
step cuda_tier 170 python3 -m pytest -q -m cuda tests/cuda tests/unit/test_device_crops.py \
    -p no:cacheprovider --junitxml "$OUT/cuda_tier.xml"
# Batch sizes that fill the GPU: per-image state of MAE ViT-B/16 and DINO ViT-S/16 / B/16 crops.
step bench_mae_vitb16 90 python3 tools/bench_train.py --methods mae --backbones vit_base_patch16 \
    --stages 2 --precision bf16 --batch 256 --world-size 1 --steps 8 --warmup 3 --compile both \
    --json "$OUT/bench_mae_vitb16.json"
step bench_dino_vits16 90 python3 tools/bench_train.py --methods dino \
    --backbones vit_small_patch16 --stages 2 --precision bf16 --batch 128 --world-size 1 \
    --steps 8 --warmup 3 --compile both --json "$OUT/bench_dino_vits16.json"
step bench_dino_vitb16 90 python3 tools/bench_train.py --methods dino \
    --backbones vit_base_patch16 --stages 2 --precision bf16 --batch 64 --world-size 1 \
    --steps 8 --warmup 3 --compile both --json "$OUT/bench_dino_vitb16.json"
step bench_loader 60 bash -c "python3 tools/bench_loader.py --make-photos /tmp/photos --count 300 \
    && python3 tools/bench_loader.py /tmp/photos --mode dino --on-device --workers 8 \
       --batch 256 --json $OUT/bench_loader.json"
echo '  "done": true' >>"$summary"
echo "}" >>"$summary"
cat "$summary"
