#!/usr/bin/env bash
# Generation on one GPU: first the CUDA-graph decoding test (tests/test_decode_graph.py records and
# replays the step on the GPU), then benchmarks/generate.py for T5, GPT-2 and LLaMA: polyhead's eager
# step against HF's eager generate, then polyhead's step replayed as a CUDA graph (--cuda-graph)
# against both HF's eager generate and HF on its StaticCache, compiled (--hf-static-cache).
# Record what it prints in benchmarks/RESULTS.md ("Generation on a GPU") with the card and the date.
#
#   bash benchmarks/gpu_generate.sh               # all three models
#   MODELS=t5 bash benchmarks/gpu_generate.sh     # one
#   PYTHON=python3 bash benchmarks/gpu_generate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
"$python" -m pytest -q -p no:cacheprovider tests/test_decode_graph.py
# most wanted first, so that a run cut short still says the most: graphed against HF's eager generate
# for every model, then against HF's compiled StaticCache, then polyhead's eager step
for sides in "--cuda-graph" "--cuda-graph --hf-static-cache" ""; do
    for model in ${MODELS:-t5 gpt2 llama}; do
        echo "== $model ${sides:-eager}"
        # shellcheck disable=SC2086  # $sides is a list of flags
        "$python" benchmarks/generate.py --device cuda --model "$model" $sides
    done
done
