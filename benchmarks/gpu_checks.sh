#!/usr/bin/env bash
# The CUDA checks a session runs when it is lent a GPU, as one prepared command (device time is short: 15 min a
# session, a few of them spent starting the machine). Run from the repository root on the GPU machine:
#
#     bash benchmarks/gpu_checks.sh            # the test suite on CUDA, then the CUDA row of throughput.py
#     GPU_CHECKS="tests" bash benchmarks/gpu_checks.sh   # only one part (tests | throughput | svd)
#
# The machine has torch, transformers, peft, accelerate and pytest but not `datasets` or `gguf`, and no network:
# `make gpu-wheels` (here, before the call) puts their wheels in .whl/, which the call must carry (`carry: [.whl]`);
# without them the tests that read data files through `datasets` or export GGUF fail with ModuleNotFoundError and
# the rest still run. thanora itself is imported from src/ (no install). Everything lands in $OUT (or
# /tmp/gpu_checks): env.txt, tests.log + tests.xml (junit), throughput_cuda.{md,json}, batched_svd_cuda.{md,json}.
# Each part has its own time limit, so a slow part cannot starve the others; the limits sum to under 9 min, inside
# one 10-min call (`timeout_s: 600`); a part cut off by its limit can be rerun alone in a second call. Copy the
# results into benchmarks/results/ here and say in benchmarks/README.md which card gave them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
PARTS=${GPU_CHECKS:-tests throughput svd}
for part in $PARTS; do
    case $part in tests | throughput | svd) ;; *) echo "GPU_CHECKS: unknown part '$part' (tests, throughput, svd)" >&2; exit 2 ;; esac
done
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, transformers, peft, accelerate; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'device', torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"
status=0
for part in $PARTS; do
    case $part in
    tests)  # the whole default suite: every training test's accelerator, and every `model.device: auto`, is CUDA here
        workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
        # shellcheck disable=SC2086
        timeout 240 python3 -m pytest -q -m "not slow" -p no:cacheprovider $workers --junitxml="$OUT/tests.xml" \
            2>&1 | tee "$OUT/tests.log" | tail -40 || status=1 ;;
    throughput)  # the synthetic CUDA row (the real model and data do not reach the machine); bf16 for every system;
        # 16 fresh processes (2 rounds x 2 mixtures x 4 systems, rank 16); GPU_CHECKS=throughput alone for rank 64 too
        ranks=$([ "$PARTS" = throughput ] && echo "16 64" || echo "16")
        # shellcheck disable=SC2086
        timeout $([ "$PARTS" = throughput ] && echo 540 || echo 240) python3 benchmarks/throughput.py --parts train \
            --model synthetic --device cuda --mixed-precision bf16 --epoch-scale 8 --rounds 2 --ranks $ranks \
            --systems 'hf, grouped' 'hf, flattened' 'thanora lora' 'thanora thanora' --out "$OUT/throughput_cuda" \
            || status=1 ;;
    svd)
        timeout 45 python3 benchmarks/batched_svd.py --device cuda --out "$OUT/batched_svd_cuda" || status=1 ;;
    esac
done
exit $status
