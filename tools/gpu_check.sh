#!/usr/bin/env bash
# The prepared GPU check: one short run on a machine with CUDA (a few minutes on one H200; the
# parts' time limits add up to 630 s).
#
#   bash tools/gpu_check.sh                       # logs go to $OUT when set, else ./gpu_check/
#   DEVICE=cpu QUICK=1 bash tools/gpu_check.sh    # a dry run of the script itself, no GPU
#
# Parts: 1. CUDA facts (torch, device, bf16). 2. The gpu-marked tests (tests/test_cuda.py: the
# network, sampler, raster baseline, tokenizer, trainer, studio engine and benchmark on the
# device). 3. The full benchmark: SCAN-L at batch 1, bf16, eager. 4. A training-speed probe:
# SCAN-S steps with the embedded default's recipe, on the emoji codes when data/emoji2-codes is
# present (carry it: 1 MB), else on synthetic codes. 5. The benchmark again under torch.compile.
# A failed part does not stop the parts after it; the exit status is non-zero when any failed.
# Needs torch, numpy, pillow, matplotlib, safetensors, einops and pytest, not gradio.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
export SCAN_TEST_DEVICE=$device
quick=()
steps=200
if [ -n "${QUICK:-}" ]; then quick=(--quick); steps=20; fi
failed=()

part() {  # part NAME SECONDS COMMAND...: run one part, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    local shown="$*"
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): ${shown:0:160}" | tee -a "$out/summary.txt"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local status=$?
    tail -n 3 "$out/$name.txt" | tee -a "$out/summary.txt"
    [ "$status" -eq 0 ] || failed+=("$name (exit $status)")
}

part cuda 60 "$python" -c '
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(props.name, f"{props.total_memory / 2**30:.0f} GiB", "bf16", torch.cuda.is_bf16_supported())
'
part tests 150 "$python" -m pytest -q -m gpu tests/test_cuda.py -p no:cacheprovider
part bench 120 "$python" -m scan_core bench --device "$device" --repeats 3 "${quick[@]}"

codes=data/emoji2-codes
train_args=(--preset SCAN-S --batch-size 32 --num-steps 16 --num-rounds 4 --tokens-per-round 2
            --eva-weight 2.0 --max-steps "$steps" --warmup-steps 20 --log-every 10
            --checkpoint-every 1000 --device "$device" --no-progress)
if [ -d "$codes" ]; then
    train_args+=(--model-set num_classes=18)
else
    codes=/tmp/gpu_check_codes
    "$python" -m scan_core data synthetic --out "$codes" --preset SCAN-S --num-images 4096
fi
rm -rf /tmp/gpu_check_run
part train 120 "$python" -m scan_core train --data "$codes" --out /tmp/gpu_check_run "${train_args[@]}"
cp /tmp/gpu_check_run/metrics.jsonl "$out/train_metrics.jsonl" 2>/dev/null
# Last: compiling may take minutes, and a slow compile should cost nothing measured above.
part bench_compiled 180 "$python" -m scan_core bench --device "$device" --repeats 3 --compile \
    "${quick[@]}"

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" | tee -a "$out/summary.txt"
    exit 1
fi
echo "all parts passed" | tee -a "$out/summary.txt"
