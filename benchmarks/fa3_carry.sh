#!/bin/bash
# Here (CPU): FlashAttention-3 (the `tokenspeed-fa3` wheel) into carry/fa3 for a device call. The wheel is 63 MB and
# the tracked tree ~43 MB, over the 64 MiB a call may take together; its one big file, the 300 MB
# flash_attn_3/_C.abi3.so, is 23 MB as xz -9e. benchmarks/fa3_setup.sh unpacks it on the device.
#   bash benchmarks/fa3_carry.sh   (then run(..., carry=["carry/fa3"]))
set -euo pipefail
WHEEL=tokenspeed-fa3==3.0.0.post20260810
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    "$WHEEL" -d "$tmp"
rm -rf carry/fa3 && mkdir -p carry/fa3/flash_attn_3
(cd "$tmp" && unzip -q ./*.whl)
cp "$tmp"/flash_attn_interface.py "$tmp"/flash_attn_config.py carry/fa3/
xz -T0 -9e -c "$tmp"/flash_attn_3/_C.abi3.so > carry/fa3/flash_attn_3/_C.abi3.so.xz
rm -rf "$tmp"
du -sh carry/fa3
