#!/bin/bash
# On the device: FlashAttention-3 from carry/fa3 (benchmarks/fa3_carry.sh) into /tmp/fa3, on PYTHONPATH.
#   source benchmarks/fa3_setup.sh
mkdir -p /tmp/fa3/flash_attn_3
cp carry/fa3/*.py /tmp/fa3/
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('carry/fa3/flash_attn_3/_C.abi3.so.xz'), open('/tmp/fa3/flash_attn_3/_C.abi3.so', 'wb'))" \
    || echo "FA3 unpack failed"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/fa3
