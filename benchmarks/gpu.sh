#!/usr/bin/env bash
# The GPU checks, prepared to run in under 8 minutes on one H100/H200 (the `device` tool):
# the tiny-model tests on CUDA (capture, architectures, memory planning, deprecations), then
# the bf16 benchmark on the default model (or its shape with random weights where the
# embedded model's package is not installed) and on a LLaMA-2-7B-shaped random model.
#   bash benchmarks/gpu.sh            # from the repository root; prints GPU name=… lines
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 240 python3 -m pytest -q -p no:cacheprovider --device cuda \
  tests/unit/test_capture.py tests/unit/test_memory.py tests/unit/test_deprecations.py \
  $(ls tests/unit/test_architectures.py 2>/dev/null) || echo "GPU tests: failures above"
timeout 300 python3 benchmarks/gpu.py --device cuda --dtype bfloat16 --models gemma-3-270m llama2-7b-shape
