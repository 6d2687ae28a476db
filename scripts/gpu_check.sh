#!/usr/bin/env bash
# Everything the GPU machine checks, in one go: GPU tests, then benchmarks; a summary last.
# Usage (repo root, on the GPU machine): bash scripts/gpu_check.sh [tests|bench|latency|bench8b|families|mixed|sampler|profile|
#   kernels|async|cascade|fp8kv|fp8w|moe|tp|ray|ray2|latency8b|profile_kernels|all]...
# tp needs two GPUs (device kind nvidia-h200-x2); all runs tests, bench and latency. ray (Ray dp=1 vs
# the plain engine) and ray2 (dp=2, two GPUs) need Ray importable (the `ray` extra).
# Expects flash-attn's wheel in .gpu/ (see README), installs it into /tmp/site.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
summary=()
for what in "${@:-all}"; do
  case $what in
    tests|all) python3 -m pytest -q -rA -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
               summary+=("tests: $(tail -n 1 "$OUT/gpu_tests.log")") ;;&
    bench|all) for i in 1 2; do python3 bench.py 2>&1 | tee -a "$OUT/bench.log"; done
               summary+=("bench 0.6B: $(grep Throughput "$OUT/bench.log" | tr '\n' ' ')") ;;&
    latency|all) python3 bench.py --latency 2>&1 | tee -a "$OUT/latency.log"
               summary+=("latency: $(grep Decode "$OUT/latency.log" | tr '\n' ' ')") ;;&
    families) for name in Qwen2.5-0.5B Llama-3.2-1B; do for i in 1 2; do
                 python3 bench.py --dummy-config $name 2>&1 | tee -a "$OUT/bench_$name.log"; done
                 summary+=("bench $name: $(grep Throughput "$OUT/bench_$name.log" | tr '\n' ' ')"); done ;;
    mixed) for i in 1 2; do python3 bench.py --mixed-sampling 2>&1 | tee -a "$OUT/mixed.log"; done
               summary+=("mixed sampling: $(grep -E 'Throughput|plain' "$OUT/mixed.log" | tr '\n' ' ')") ;;
    sampler) python3 scripts/bench_sampler.py 2>&1 | tee -a "$OUT/sampler.log"
               summary+=("sampler: $(grep ms/step "$OUT/sampler.log" | tr '\n' ' ')") ;;
    profile) python3 scripts/profile_steps.py 2>&1 | tee -a "$OUT/profile.log"
               summary+=("profile: $(grep -E 'tok/s|total s' "$OUT/profile.log" | tr '\n' ' ')") ;;
    tp) python3 -m pytest -q -rA tests/test_gpu.py -k tensor_parallel 2>&1 | tee "$OUT/tp_tests.log"
        for i in 1 2; do python3 bench.py --tensor-parallel-size 2 2>&1 | tee -a "$OUT/bench_tp2.log"; done
        summary+=("tp tests: $(tail -n 1 "$OUT/tp_tests.log")" "bench tp=2: $(grep Throughput "$OUT/bench_tp2.log" | tr '\n' ' ')"
                  "left over: $(nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l) GPU processes, $(ls /dev/shm | grep -c nanovllm) shared-memory segments") ;;
    ray|ray2) dp=$([ "$what" = ray2 ] && echo 2 || echo 1)
        for i in 1 2; do python3 scripts/bench_ray.py --data-parallel-size $dp 2>&1 | tee -a "$OUT/bench_$what.log"; done
        summary+=("ray dp=$dp vs plain: $(grep -E 'Throughput|/ plain' "$OUT/bench_$what.log" | tr '\n' ' ')")
        if [ "$what" = ray2 ]; then python3 -m pytest -q -rA tests/test_ray_gpu.py 2>&1 | tee "$OUT/ray_gpu_tests.log"
          summary+=("ray GPU tests: $(tail -n 1 "$OUT/ray_gpu_tests.log")"); fi ;;
    kernels) python3 scripts/count_kernels.py 2>&1 | tee -a "$OUT/kernels.log"
               summary+=("kernels: $(grep -E 'per layer|replay' "$OUT/kernels.log" | tr '\n' ' ')") ;;
    async) for flag in "" --no-async-scheduling; do python3 bench.py --latency $flag 2>&1 | tee -a "$OUT/async.log"; done
               summary+=("latency async on, then off: $(grep Decode "$OUT/async.log" | tr '\n' ' ')") ;;
    cascade) python3 scripts/bench_cascade.py 2>&1 | tee -a "$OUT/cascade.log"
             for w in shared-prefix n-samples; do for flag in --no-cascade --cascade; do
               python3 bench.py --workload $w $flag 2>&1 | tee -a "$OUT/cascade.log"; done; done
             summary+=("cascade: $(grep -E 'speedup|decode:' "$OUT/cascade.log" | tr '\n' ' ')") ;;
    fp8kv) for i in 1 2; do python3 bench.py --kv-cache-dtype fp8 2>&1 | tee -a "$OUT/fp8kv.log"; done
           python3 scripts/kv_cache_accuracy.py 2>&1 | tee -a "$OUT/fp8kv.log"
           summary+=("fp8 KV cache: $(grep -E 'Throughput|max abs' "$OUT/fp8kv.log" | tr '\n' ' ')") ;;
    fp8w) python3 -m pytest -q -rA -m gpu tests/test_fp8.py 2>&1 | tee "$OUT/fp8w_tests.log"
          python3 scripts/bench_fp8_gemm.py --m 1 256 4096 2>&1 | tee -a "$OUT/fp8w.log"
          for i in 1 2; do for q in "" "--quantization fp8"; do
            python3 bench.py --dummy-config Qwen3-8B $q 2>&1 | tee -a "$OUT/fp8w.log"; done; done
          summary+=("FP8 weights tests: $(tail -n 1 "$OUT/fp8w_tests.log")"
                    "8B bench bf16 / FP8 alternating: $(grep Throughput "$OUT/fp8w.log" | tr '\n' ' ')") ;;
    moe) python3 scripts/bench_moe.py 2>&1 | tee -a "$OUT/moe.log"
         python3 bench.py --dummy-config Qwen3-30B-A3B --repeat 2 2>&1 | tee -a "$OUT/moe.log"
         summary+=("MoE 30B-A3B: $(grep Throughput "$OUT/moe.log" | tr '\n' ' ')") ;;
    bench8b) for i in 1 2; do python3 bench.py --dummy-config Qwen3-8B 2>&1 | tee -a "$OUT/bench8b.log"; done
               summary+=("bench 8B: $(grep Throughput "$OUT/bench8b.log" | tr '\n' ' ')") ;;
    latency8b) for q in "" "--quantization fp8"; do python3 bench.py --dummy-config Qwen3-8B --latency $q 2>&1 \
                 | tee -a "$OUT/latency8b.log"; done
               summary+=("latency 8B bf16, then FP8 weights: $(grep Decode "$OUT/latency8b.log" | tr '\n' ' ')") ;;
    profile_kernels) for kv in auto fp8; do python3 scripts/profile_kernels.py --kv-cache-dtype $kv 2>&1 \
                 | tee -a "$OUT/profile_kernels.log"; done
               summary+=("GPU time, bf16 then FP8 cache: $(grep -E 'GPU busy|_decode_kernel' "$OUT/profile_kernels.log" | tr '\n' ' ')") ;;
  esac
done
echo "==== summary"
printf '%s\n' "${summary[@]}"
