#!/usr/bin/env bash
# GPU smoke test: what CPU tests cannot show (CUDA, AMP, torch.compile, NCCL, DDP, SyncBN, GPU
# timings). Not part of the CPU suite. Budget: <= 8 minutes on one GPU with 16 CPU cores and no
# internet, once the demo cache exists. Build that cache on the CPU beforehand (the demo data, the
# segmentation data, the demo teachers test_resnet and test_efficientnet, MEAL V2's demo student
# init; 9 MiB, about 7 minutes on 2 busy cores), then pass it with KD_DEMO_CACHE:
#
#     SMOKE_PREPARE=1 KD_DEMO_CACHE=/path/cache bash tests/gpu/smoke.sh /tmp/prep   # CPU machine
#     KD_DEMO_CACHE=/path/cache bash tests/gpu/smoke.sh OUT                          # GPU machine
#     SMOKE_DRY=1 bash tests/gpu/smoke.sh OUT    # print each command ("cmd: ..."), run nothing heavy
#
# OUT defaults to /tmp/kd_gpu_smoke, KD_DEMO_CACHE to OUT/cache (a missing cache is built first, on
# the CPU, outside the budget). One line per check: "ok"/"FAIL", seconds, its log (OUT/logs/NAME.log);
# at the end every figure as one table on stdout and in OUT/smoke_table.md (tests/gpu/smoke_table.py:
# val top-1 / mIoU, teacher top-1, epoch and step times, the benchmarks' CUDA rows). Exit status 1
# if any check failed. Each command runs under `timeout`: SMOKE_CHECK_TIMEOUT (300 s) and the time
# left before SMOKE_DEADLINE (460 s after the cache is ready; a check past it fails as skipped).
#
# The method runs go through torchrun --nproc_per_node=1 with KD_DDP=1: common.dist.setup() starts
# a process group of one (NCCL), so the files wrap their networks in DDP and bake.py converts BN to
# SyncBN; TORCH_DISTRIBUTED_DEBUG=INFO and TORCH_CPP_LOG_LEVEL=INFO make torch log each DDP model,
# and `smoke_table.py verify` checks from that log: DDP, world size 1, backend nccl, SyncBN in BAKE.
# In a group of one SyncBN normalizes with its own batch (torch skips the exchange for one process):
# the statistics cross processes only in bake-2gpu, which needs 2+ GPUs.
#
#   check              expected (H200)   what
#   env                ~5 s              the GPU(s), torch, CUDA, NCCL, bf16; no CUDA: the script stops
#   cache              ~2 s              the demo cache is complete (built here if not: minutes, CPU)
#   dist               ~15 s             tests/gpu/dist_check.py: NCCL collectives, sharded evaluate, DDP
#                                        steps under fp16 / bf16 autocast, SyncBN
#   meal_v2-labels     ~15 s             Fast MEAL V2's store: fkd.py --mode label --codec full with MEAL
#                                        V2's two demo teachers (fp32 labels, as the official code)
#   METHOD-VARIANT     ~15-30 s each,    18 demo runs, SMOKE_JOBS (4) at a time, --compile ones first.
#                      --compile ~40-90, METHOD: fkd (3 epochs, --num-crops 2: pass_plan gives one 2-crop
#                      ~3-4 min in all   pass, then 1 crop), bake (2 epochs, then its baseline), meal_v2
#                                        (2, online teachers), fast_meal_v2 (3, --labels, one 2-crop
#                                        pass), frskd (2, + baseline), frskd_seg (--task segmentation, 2
#                                        with 1 warm-up epoch, + baseline). VARIANT: fp16 (--amp), bf16
#                                        (--amp --amp-dtype bfloat16), compile (--amp --compile)
#   bake-2gpu          ~30 s             only with 2+ GPUs: bake.py under --nproc_per_node=2 (SyncBN)
#   train_steps-fp16,  ~30 s each        tests/benchmarks/train_steps.py --device cuda (each step waits
#   train_steps-bf16                     for the GPU)
#   fkd_pipeline       ~45 s             tests/benchmarks/fkd_pipeline.py --device cuda (labelling vs
#                                        bare teacher, loader, store reads)
# The method runs share the GPU and the CPUs (SMOKE_JOBS at a time), so their times are under that
# sharing (SMOKE_JOBS=1 for solo times, over the budget); the benchmarks run alone, last.
set -u
WORK=$(realpath -m "${1:-/tmp/kd_gpu_smoke}")
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
DRY=${SMOKE_DRY:-0}
JOBS=${SMOKE_JOBS:-4}
LIMIT=${SMOKE_CHECK_TIMEOUT:-300}
DEADLINE=${SMOKE_DEADLINE:-460}
START=$(date +%s) T0=$(date +%s)
RUNS=$WORK/runs LOGS=$WORK/logs BENCH=$WORK/bench
HELPER=tests/gpu/smoke_table.py
export KD_DEMO_CACHE=${KD_DEMO_CACHE:-$WORK/cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DDP_ENV=(env KD_DDP=1 TORCH_DISTRIBUTED_DEBUG=INFO TORCH_CPP_LOG_LEVEL=INFO)
TORCHRUN=("$PY" -m torch.distributed.run --standalone)

x() {  # x COMMAND...: run it under the time left; SMOKE_DRY=1: print it ("cmd: ...") instead
    if [ "$DRY" = 1 ]; then
        printf 'cmd:'; printf ' %q' "$@"; echo
        return 0
    fi
    local left=$((START + DEADLINE - $(date +%s)))
    [ "$left" -gt "$LIMIT" ] && left=$LIMIT
    if [ "$left" -le 0 ]; then
        echo "skipped: past SMOKE_DEADLINE (${DEADLINE} s)"
        return 75
    fi
    timeout -k 10 "$left" "$@"
}

untimed() {  # untimed COMMAND...: run it without a time limit (the cache: outside the budget)
    if [ "$DRY" = 1 ]; then x "$@"; else "$@"; fi
}

last_words() {  # the line of a log that says why it failed (not torch's C++ INFO lines)
    local quiet='^[[:space:]]*$|^(\[rank[0-9]+\]:)?\[I[0-9]{4} '
    grep -v -E "$quiet" "$1" | grep -i -E 'error|fail|assert|skipped' | tail -n 1 | grep . ||
        grep -v -E "$quiet" "$1" | tail -n 1
}

check() {  # check NAME COMMAND...: run it into LOGS/NAME.log, one line: ok/FAIL, seconds, log
    local name=$1; shift
    if [ "$DRY" = 1 ]; then "$@"; return 0; fi
    local log="$LOGS/$name.log" began rc=0 line
    began=$(date +%s)
    "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
        line="ok   $name ($(($(date +%s) - began)) s) [$log]"
    else
        local why; why=$(last_words "$log" | cut -c1-200)
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out (SMOKE_CHECK_TIMEOUT, SMOKE_DEADLINE); $why"
        line="FAIL $name ($(($(date +%s) - began)) s, exit $rc): $why [$log]"
    fi
    echo "$line" >>"$WORK/checks.txt"
    echo "$line"
}

spawn() {  # spawn NAME COMMAND...: check in the background, at most SMOKE_JOBS at a time
    if [ "$DRY" = 1 ]; then check "$@"; return 0; fi
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    check "$@" &
}

demo_run() {  # demo_run NAME NPROC SCRIPT EPOCHS [FLAGS...]: a demo run under a process group
    local name=$1 nproc=$2 script=$3 epochs=$4; shift 4
    local sync=(); [ "$script" = bake.py ] && sync=(--sync-bn)
    x "${DDP_ENV[@]}" "${TORCHRUN[@]}" --nproc_per_node="$nproc" "$script" --data demo --epochs "$epochs" \
        --out "$RUNS/$name" "$@" &&
        x "$PY" "$HELPER" verify "$RUNS/$name" "$epochs" "$LOGS/$name.log" --world "$nproc" "${sync[@]}"
}

plan() {  # plan METHOD: M = (script epochs flags...) of that method's demo runs
    case $1 in
        fkd) M=(fkd.py 3 --num-crops 2) ;;  # passes: epochs 1-2 with 2 crops, epoch 3 with 1
        bake) M=(bake.py 2) ;;
        meal_v2) M=(meal_v2.py 2 --lr-drop-epoch 1) ;;
        fast_meal_v2) M=(meal_v2.py 3 --labels "$RUNS/labels/meal_v2" --num-crops 2 --lr-drop-epoch 2) ;;
        frskd) M=(frskd.py 2 --milestones 1 --warmup-epochs 1) ;;
        frskd_seg) M=(frskd.py 2 --task segmentation --warmup-epochs 1 --milestones 1) ;;
    esac
}

if [ "$DRY" != 1 ]; then
    mkdir -p "$WORK"
    rm -rf "$RUNS" "$LOGS" "$BENCH" "$WORK/checks.txt" "$WORK/smoke_table.md"
    mkdir -p "$RUNS/labels" "$LOGS" "$BENCH"
fi
if [ "${SMOKE_PREPARE:-0}" = 1 ]; then  # the demo cache only, on the CPU
    check cache untimed "$PY" "$HELPER" cache
    [ "$DRY" = 1 ] || tail -n 1 "$LOGS/cache.log"
    ! grep -q '^FAIL' "$WORK/checks.txt" 2>/dev/null
    exit
fi

check env x "$PY" "$HELPER" env
if [ "$DRY" != 1 ]; then
    head -n 1 "$LOGS/env.log"
    grep -q '^FAIL' "$WORK/checks.txt" && exit 1  # no CUDA: nothing below can pass
fi
GPUS=$(sed -n 's/^gpu_count=//p' "$LOGS/env.log" 2>/dev/null)
check cache untimed "$PY" "$HELPER" cache
START=$(date +%s)  # the budget counts from a ready cache
check dist x "${TORCHRUN[@]}" --nproc_per_node=1 tests/gpu/dist_check.py --device cuda
check meal_v2-labels x "${DDP_ENV[@]}" "${TORCHRUN[@]}" --nproc_per_node=1 fkd.py --data demo --mode label \
    --codec full --teacher test_resnet --teacher test_efficientnet --labels "$RUNS/labels/meal_v2"

for variant in compile fp16 bf16; do  # the slowest first
    case $variant in
        fp16) V=(--amp) ;;
        bf16) V=(--amp --amp-dtype bfloat16) ;;
        compile) V=(--amp --compile) ;;
    esac
    for method in fkd bake meal_v2 fast_meal_v2 frskd frskd_seg; do
        plan "$method"
        name=$method-$variant
        [ "$method" = fkd ] && M+=(--labels "$RUNS/labels/$name")
        spawn "$name" demo_run "$name" 1 "${M[@]}" "${V[@]}"
    done
done
wait

if [ "$DRY" = 1 ] || [ "${GPUS:-1}" -ge 2 ]; then  # BAKE's SyncBN across two real GPUs
    check bake-2gpu demo_run bake-2gpu 2 bake.py 1 --amp --sync-bn on
fi
check train_steps-fp16 x "$PY" tests/benchmarks/train_steps.py --device cuda --amp --size 224 --batch 128 \
    --repeats 5 --json "$BENCH/train_steps-fp16.json"
check train_steps-bf16 x "$PY" tests/benchmarks/train_steps.py --device cuda --amp --amp-dtype bfloat16 \
    --size 224 --batch 128 --repeats 5 --json "$BENCH/train_steps-bf16.json"
check fkd_pipeline x "$PY" tests/benchmarks/fkd_pipeline.py --device cuda --amp --images 64 --size 224 \
    --label-batch 64 --loader-crops 512 --store-images 20000 --json "$BENCH/fkd_pipeline.json"

if [ "$DRY" = 1 ]; then
    x "$PY" "$HELPER" table "$WORK"
    exit 0
fi
echo
"$PY" "$HELPER" table "$WORK" || echo "FAIL table ($HELPER table $WORK)" >>"$WORK/checks.txt"
echo "took $(($(date +%s) - T0)) s, $(($(date +%s) - START)) s after the cache was ready; logs in $LOGS"
! grep -q '^FAIL' "$WORK/checks.txt"
