#!/usr/bin/env bash
# The GPU checks of issue 7 in one command, for a session lent a GPU machine (15 minutes of device time in all,
# the machine's start included): correctness on CUDA first, then the timings, each step under its own timeout so
# that what finished comes back (~9 minutes at most: give the device call timeout_s=590). From the repository root,
# with the machine's own python3 (torch with CUDA; the package needs no install there):
#
#   bash benchmarks/gpu_session.sh            # writes under $OUT (the device tool's output folder)
#
# DEVICE=cpu PYTHON=.venv/bin/python BENCH_EXTRA=--quick OUT=/tmp/gpu-dry bash benchmarks/gpu_session.sh   # dry run
set -u -o pipefail
out=${OUT:-gpu-session}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1

"$python" - <<'EOF' 2>&1 | tee "$out/environment.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

# every configuration in eager and TorchScript on the device, then compiled (inductor / Triton) for the losses
# the issue names, each against eager on the CPU
timeout 90 "$python" -m visdet_export check --device "$device" --runtimes eager,script -q 2>&1 | tee "$out/check.txt"
timeout 120 "$python" -m visdet_export check --device "$device" --runtimes compile -q \
    --configs focal,qfl,giou,dfl,ce_softmax,ce_sigmoid_labels 2>&1 | tee -a "$out/check.txt"

# mixed precision: every configuration in eager and TorchScript inside CUDA's float16 autocast, against eager outside
# it (CUDA autocast refuses operators CPU autocast allows: tests/test_autocast.py runs on the CPU only)
timeout 45 "$python" -m visdet_export check --device "$device" --runtimes eager,script --autocast float16 -q 2>&1 \
    | tee "$out/check_autocast.txt"

# the issue's named losses in float32, then bfloat16 (RESULTS.md, GPU); results.json / results.md are rewritten
# after every configuration, so a run the timeout cuts short keeps what it measured ("complete": false)
timeout 290 "$python" benchmarks/run.py --device "$device" --dtypes float32,bfloat16 \
    --losses focal,qfl,giou,ce_sigmoid_labels --repeats 5 --cell-budget-s 4 --out "$out/bench" ${BENCH_EXTRA:-} \
    2>"$out/bench.log" | tail -n 40
