#!/usr/bin/env bash
# Training throughput on one GPU at BERT-base size (110M parameters, sequence 512, batch 32), bf16
# autocast, both sides compiled: polyhead against HF transformers' BertForPreTraining, with MFU
# against the card's datasheet peak (Lightning's table of known GPUs; --peak-tflops for another),
# after the MFU ceiling of that step (benchmarks/mfu_ceiling.py: its matrix products alone).
# Record what it prints in benchmarks/RESULTS.md with the card's name and the date.
#
#   bash benchmarks/gpu.sh                       # the BERT case
#   bash benchmarks/gpu.sh --cases bert,t5       # and T5 at the same size (12 + 12 layers)
#   PYTHON=python3 bash benchmarks/gpu.sh        # another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"${PYTHON:-python}" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# the ceiling first: the same step's matrix products and attention alone (seconds, not minutes)
"${PYTHON:-python}" benchmarks/mfu_ceiling.py --device cuda --layers 12 --d-model 768 --d-ff 3072 \
    --heads 12 --batch 32 --seq 512 --dtype bf16
exec "${PYTHON:-python}" benchmarks/train_throughput.py --device cuda --bert-base --batch 32 \
    --precision bf16 --compile --steps 10 --repeats 5 --cases bert "$@"
