#!/usr/bin/env bash
# GPU smoke test: what CPU tests cannot show (CUDA, AMP, NCCL, SyncBN, GPU timings). Not part of
# the CPU suite. On one GPU it takes about 5-10 minutes (the first run also trains and caches the
# demo teachers on the CPU):
#
#     bash tests/gpu/smoke.sh [WORK_DIR]        # default WORK_DIR: /tmp/kd_gpu_smoke
#
# One line per check ("ok" or "FAIL", seconds, and where its log is); exit status 1 if any failed.
#   env          the GPU, torch and CUDA versions
#   dist         NCCL process group (device_id), collectives, sharded evaluate with an empty
#                shard, DDP steps under float16 and bfloat16 autocast, SyncBN (tests/gpu/dist_check.py)
#   fkd / bake / meal_v2 / frskd
#                each script on the demo with --amp for 2 epochs under torchrun --nproc_per_node=1;
#                metrics.jsonl must hold epochs 1..2 with finite losses
#   bf16+compile bake.py --amp --amp-dtype bfloat16 --compile, 1 epoch
#   bake ddp     with 2+ GPUs: bake.py under torchrun --nproc_per_node=2 (SyncBN in real DDP)
#   train_steps  tests/benchmarks/train_steps.py --device cuda --amp (step times wait for the GPU)
#   fkd_pipeline tests/benchmarks/fkd_pipeline.py --device cuda (label generation vs bare teacher)
set -u
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/kd_gpu_smoke}
PY=${PYTHON:-python}
export KD_DEMO_CACHE=${KD_DEMO_CACHE:-$WORK/cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LIMIT=${SMOKE_CHECK_TIMEOUT:-420}  # seconds per command
T=(timeout "$LIMIT")
TORCHRUN=("${T[@]}" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1)
mkdir -p "$WORK/logs"
rm -rf "$WORK/runs"
failed=0

check() {  # check NAME COMMAND...: run it, print one line
    local name=$1; shift
    local log="$WORK/logs/${name//[^a-z0-9_+-]/_}.log" began=$SECONDS rc=0
    "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "ok   $name ($((SECONDS - began)) s)"
    else
        echo "FAIL $name ($((SECONDS - began)) s, exit $rc): $(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-200) [$log]"
        failed=1
    fi
}

epochs_done() {  # epochs_done OUT N: every metrics.jsonl under OUT holds epochs 1..N, finite losses
    "$PY" - "$1" "$2" <<'EOF'
import glob, json, math, sys
out, epochs = sys.argv[1], int(sys.argv[2])
logs = glob.glob(f"{out}/**/metrics.jsonl", recursive=True)
assert logs, f"no metrics.jsonl under {out}"
for path in logs:
    records = [json.loads(line) for line in open(path)]
    assert records and records[-1]["epoch"] == epochs, f"{path}: epochs {[r['epoch'] for r in records]}"
    assert all(math.isfinite(r["train_loss"]) for r in records), f"{path}: non-finite train_loss"
    print(path, "val_top1", records[-1].get("val_top1"))
EOF
}

run_demo() {  # run_demo NAME SCRIPT EPOCHS [FLAGS...]: a demo run under torchrun, then its metrics
    local name=$1 script=$2 epochs=$3; shift 3
    "${TORCHRUN[@]}" "$script" --data demo --amp --epochs "$epochs" --out "$WORK/runs/$name" "$@" &&
        epochs_done "$WORK/runs/$name" "$epochs"
}

check env "${T[@]}" "$PY" -c "
import torch
assert torch.cuda.is_available(), 'no CUDA GPU visible'
print(torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s); torch', torch.__version__,
      'CUDA', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"
head -n 1 "$WORK/logs/env.log"
check dist "${TORCHRUN[@]}" tests/gpu/dist_check.py --device cuda
check fkd run_demo fkd fkd.py 2
check bake run_demo bake bake.py 2
check meal_v2 run_demo meal_v2 meal_v2.py 2 --lr-drop-epoch 1
check frskd run_demo frskd frskd.py 2 --milestones 1
check bf16+compile run_demo bake_bf16_compile bake.py 1 --amp-dtype bfloat16 --compile --baseline
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    check "bake ddp" "${T[@]}" "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
        bake.py --data demo --amp --epochs 1 --sync-bn on --out "$WORK/runs/bake_ddp"
fi
check train_steps "${T[@]}" "$PY" tests/benchmarks/train_steps.py --device cuda --amp --size 224 --batch 128 \
    --repeats 5 --json "$WORK/train_steps.json"
check fkd_pipeline "${T[@]}" "$PY" tests/benchmarks/fkd_pipeline.py --device cuda --amp --images 64 --size 224 \
    --label-batch 64 --loader-crops 512 --store-images 20000 --json "$WORK/fkd_pipeline.json"
echo "logs and benchmark JSON in $WORK"
exit $failed
