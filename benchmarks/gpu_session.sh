#!/usr/bin/env bash
# What issues #4, #5 and #18 measure on a GPU, each in one call of the workplace's device tool (each well under its
# 600 s limit; a later call reuses an earlier one's compile cache when the machine is still warm).
#
# Here, once per checkout (the GPU image has torch, timm, transformers, typer, rich and safetensors but not
# fvcore and what it needs; all four are pure Python, copied from this venv):
#     bash benchmarks/gpu_session.sh prepare
# Then, with the device tool, carry [".gpu_site"], timeout_s 600:
#     bash benchmarks/gpu_session.sh checks       # GPU tests, recover_throughput.py, a tiny inference smoke (<10 min)
#     bash benchmarks/gpu_session.sh inference    # benchmarks/inference_speed.py --skip-cpu (~8 min)
#     bash benchmarks/gpu_session.sh speed        # the fused kernel's GPU tests, then benchmarks/gpu_speed.py: the
#                                                 # issue-18/27 table, DeiT-B and BERT-base, lrc grouped too (<10 min)
#     bash benchmarks/gpu_session.sh decode       # gpu_speed.py's Llama-style decoder (issue 27): prefill at 512
#                                                 # tokens every way, decode tokens/s at batch 1 and 16 (<10 min)
#     bash benchmarks/gpu_session.sh issue27      # issue 27's GPU table in ONE call (a session lends 15 device
#                                                 # minutes): gpu_speed.py --quick, all three models (<10 min)
# Every result lands in $OUT (logs and JSON), also when a step fails or runs out of time.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
    site=$(python -c 'import fvcore, os; print(os.path.dirname(os.path.dirname(fvcore.__file__)))') || exit 1
    rm -rf .gpu_site && mkdir -p .gpu_site
    for pkg in fvcore iopath yacs termcolor; do cp -r "$site/$pkg" .gpu_site/ || exit 1; done
    find .gpu_site -name __pycache__ -prune -exec rm -rf {} +
    exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")"
    grep -qx '/.gpu_site/' "$exclude" 2>/dev/null || echo '/.gpu_site/' >> "$exclude"
    du -sh .gpu_site
    exit 0
fi

case "${1:-}" in checks|inference|speed|decode|issue27) ;; *) echo "usage: bash benchmarks/gpu_session.sh prepare|checks|inference|speed|decode|issue27" >&2; exit 2 ;; esac
[ -d .gpu_site ] || { echo "Error: .gpu_site/ is missing: run 'bash benchmarks/gpu_session.sh prepare' here and carry it" >&2; exit 1; }
export PYTHONPATH="$PWD/.gpu_site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/lrc-gpu}
mkdir -p "$OUT"
python3 -c 'import torch, timm, fvcore, lowrank_cli; print("torch", torch.__version__, "timm", timm.__version__,
"cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))' 2>&1 | tee "$OUT/env.log"
python3 -c 'import triton; print("triton", triton.__version__)' 2>&1 | tee -a "$OUT/env.log"

case "${1:-}" in
    checks)
        # (the fused kernel's GPU tests run in `speed`)
        timeout 120 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --ignore=tests/layers \
            --ignore=tests/models/test_fusion.py -k "not gpu_bench_fuses" 2>&1 | tee "$OUT/gpu_tests.log"
        timeout 240 python3 benchmarks/recover_throughput.py --json >"$OUT/recover_throughput.json" \
            2> >(tee "$OUT/recover_throughput.log" >&2)
        cat "$OUT/recover_throughput.json"
        # The inference benchmark's GPU code on a tiny ViT: a fault shows here, not 8 minutes into `inference`.
        timeout 200 python3 benchmarks/inference_speed.py --skip-cpu --arch vit_tiny_patch16_224 --gpu-batch 64 \
            --json "$OUT/inference_smoke.json" 2>&1 | tee "$OUT/inference_smoke.log" | grep -v "repeat\|warm-up"
        ;;
    inference)
        timeout 560 python3 benchmarks/inference_speed.py --skip-cpu --json "$OUT/inference_speed.json" 2>&1 \
            | tee "$OUT/inference_speed.log"
        ;;
    speed)
        # The kernel against the two linears on the GPU (grid of shapes, bf16/fp16, compile + CUDA graphs), then
        # the table; gpu_speed.py rewrites its JSON after every step, so a cut-short run keeps what it measured.
        # The tests also fill Triton's kernel cache for the benchmark (same ranks and dtypes).
        timeout 160 python3 -m pytest -q -m gpu -p no:cacheprovider tests/layers tests/models/test_fusion.py \
            tests/evaluation/test_bench.py -k "gpu_bench_fuses or not test_bench" 2>&1 \
            | tee "$OUT/fused_gpu_tests.log" | tail -25
        timeout 400 python3 benchmarks/gpu_speed.py --min-time 0.5 --json "$OUT/gpu_speed.json" 2>&1 \
            | tee "$OUT/gpu_speed.log"
        ;;
    decode)
        # The grouping's GPU path first (exact against ungrouped, bf16 and fp32), then the decoder's rows; the
        # JSON is rewritten after every step.
        timeout 60 python3 -m pytest -q -p no:cacheprovider tests/models/test_grouping.py 2>&1 \
            | tee "$OUT/grouping_tests.log" | tail -5
        timeout 520 python3 benchmarks/gpu_speed.py --models llama_decoder --min-time 0.5 \
            --json "$OUT/gpu_decode.json" 2>&1 | tee "$OUT/gpu_decode.log"
        ;;
    issue27)
        # The grouping's GPU test (seconds), then the table: BERT-base first (the worst row today), the decoder,
        # DeiT-B last; the JSON is rewritten after every step, so a run cut short keeps what it measured.
        timeout 45 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/test_grouping.py 2>&1 \
            | tee "$OUT/grouping_tests.log" | tail -3
        timeout 530 python3 benchmarks/gpu_speed.py --quick --models bert_base,llama_decoder,deit_base \
            --min-time 0.3 --decode-tokens 32 --json "$OUT/gpu_speed_issue27.json" 2>&1 \
            | tee "$OUT/gpu_speed_issue27.log"
        ;;
esac
