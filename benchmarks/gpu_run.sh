#!/bin/bash
# Device-machine preamble shared by the GPU benchmark calls: server wheels from carry/wheels (the
# device image lacks fastapi/uvicorn/websockets), the package from src/ (pip install -e needs network).
set -o pipefail
if ls carry/wheels/*.whl >/dev/null 2>&1; then  # a call may carry other things instead (carry/fa3)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        $(ls carry/wheels/*.whl | grep -v -E "diffusers|torchao") >/dev/null 2>&1 || echo "wheel install failed"
fi
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
# bytecode cached outside read-only site-packages, as an installed package has it (else every fresh process
# recompiles ~600 modules from source: 1.4 s of a warm start-up, measured with paths.py --profile-start)
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pycache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
