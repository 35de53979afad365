#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the `cuda`-marked tests, `offload generate` on the
# default GPU path, and `offload bench --ablate` over a real host-to-device link (CudaLink).
#
#     OUT=/tmp/cuda-check bash benchmarks/cuda_check.sh
#
# Packages the GPU machine lacks (hqq, bitsandbytes, pexpect) may be unpacked into .whl/site.
set -u
OUT=${OUT:-/tmp/cuda-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.whl/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
MODEL=${MODEL:-/tmp/offload-bench/moe-2048}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/machine.txt"

echo "== cuda-marked tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda \
    tests/test_quant_codec.py tests/test_link.py tests/test_offload_equivalence.py tests/test_device_kernels.py \
    tests/test_cache_in_place.py tests/test_host_form.py tests/test_hybrid.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -25

echo "== generate on the GPU (auto profile: hqq experts quantized at load), offloaded with K=2"
timeout 120 python3 -m cli.main generate --device cuda -k 2 --prefetch 2 --temperature 0 --max-new-tokens 24 \
    --json "What does json.dumps do?" 2>&1 | tee "$OUT/generate.json" | tail -5

echo "== a random model of 3 GB, drawn on the GPU"
timeout 120 python3 benchmarks/random_model.py --out "$MODEL" --hidden 2048 --ffn 7168 --layers 4 --device cuda
# Quantize once (on the CPU, as load-time quantization would in every process), then load that.
timeout 300 python3 -m cli.main convert "$MODEL" "$MODEL-hqq" --attention hqq:4:64 --experts hqq:4:64 --force \
    > "$OUT/convert.txt" 2>&1; tail -3 "$OUT/convert.txt"
MODEL="$MODEL-hqq"

echo "== which kernel the 4-bit experts run (torch's int4 kernel, else HQQLinear after a logged probe failure)"
timeout 120 python3 - "$MODEL" <<'EOF' 2>&1 | tee "$OUT/expert_kernel.txt"
import sys, torch
from offload.loading import OffloadOptions, load_model
from offload.quant.device_kernels import unusable_because
model = load_model(sys.argv[1], device="cuda", dtype="bfloat16", offload=OffloadOptions(experts_per_layer=2))
source = model.expert_source
source.cache.load(0, 0)
expert = source.cache.acquire(0, 0)
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability(), "| int4 kernel:",
      unusable_because(torch.device("cuda")) or "usable", "| experts run", type(expert.w2).__name__,
      "| attention runs", type(model.model.layers[0].self_attn.o_proj).__name__,
      "| bytes built beside the slots", source.memory().device_bytes - source.cache.nbytes)
EOF

echo "== where the host time goes (cProfile), full and no-prefetch"
for prefetch in 2 0; do
    timeout 120 python3 benchmarks/profile_decode.py --model "$MODEL" --device cuda --dtype bfloat16 -k 4 \
        --prefetch $prefetch --new-tokens 8 --top 30 > "$OUT/profile_prefetch$prefetch.txt" 2>&1
    head -3 "$OUT/profile_prefetch$prefetch.txt"
done

echo "== bench --ablate over CudaLink"
timeout 300 python3 -m cli.main bench --model "$MODEL" --device cuda --dtype bfloat16 --ablate -k 4 --prefetch 2 \
    --runs 3 --new-tokens 32 --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.txt" | tail -40
