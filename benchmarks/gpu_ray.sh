#!/bin/bash
# Device-machine preamble for the Ray Serve benchmarks (source it from the repo root, carry=["carry/ray"]):
# unpacks carry/ray/bundle.tar.xz (benchmarks/ray_bundle.sh: stripped ray 2.60 + the ray[serve] and server
# dependencies the device image lacks) into /tmp/site and puts src/ and /tmp/site on PYTHONPATH.
set -o pipefail
mkdir -p /tmp/site && tar -xJf carry/ray/bundle.tar.xz -C /tmp/site || echo "ray bundle unpack failed"
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pycache
# grpcio is not carried (size): grpc_reflection's stub refuses a grpcio older than the one it was generated
# with; Serve only imports it (its gRPC proxy is off), so lower the guard to the device's grpcio if older.
python3 - <<'PY'
import re, grpc
from pathlib import Path
p = Path("/tmp/site/grpc_reflection/v1alpha/reflection_pb2_grpc.py")
s = p.read_text()
gen = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", s).group(1)
key = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:3])
if key(grpc.__version__) < key(gen):
    p.write_text(s.replace(f"GRPC_GENERATED_VERSION = '{gen}'", f"GRPC_GENERATED_VERSION = '{grpc.__version__}'"))
    print(f"grpc_reflection guard lowered from grpcio {gen} to the device's {grpc.__version__}")
else:
    print(f"device grpcio {grpc.__version__} >= {gen}")
PY
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
