source benchmarks/gpu_run.sh
timeout 150 python3 benchmarks/attention_fp8.py --models large --lengths 4429 --steps 30 --out $OUT/attention_exp.json 2>&1 | grep -v Warn | tail -14
SD35FP8_ATTN_EXP=split timeout 120 python3 -m pytest -q -x tests/test_attention_triton.py 2>&1 | tail -3
