"""Where the step cache's skips go: forced skip placements (and forecasts) on the shipped model, euler.

    python benchmarks/cache_placement.py N THREADS PATTERN:FORECAST[,...] [STEPS]
    python benchmarks/cache_placement.py 256 2 alt:linear,warm4:linear,g1:linear 20
    python benchmarks/cache_placement.py 256 1 error@0.2@0.5:linear 20   # step_cache's rule and RUNS, warmup 0.2, threshold 0.5

A pattern is one letter per model call (F computed, S forecast); the names are in PATTERNS below (printed
at start). Forecasts: linear / velocity / x0 (step_cache's reuse), quad (through the last three full
calls), damped (half linear, half last velocity), corr / corrG (linear, then the next full call adds back
G times the difference to the interpolated velocity). Prints, per variant, the full-step ratio, mean PSNR
against the uncached images and the detector score delta (points); writes benchmarks/results/
cache_placement_N_STEPS_cpu.json. Session 18 used it to choose step_cache.WARMUP / RUNS (log:
benchmarks/results/cache_placement_cpu.log). A research tool: the benchmark of record is faster.py tiny.
"""
import sys, time, json
from pathlib import Path
import numpy as np, torch
from sd35fp8 import generation, step_cache
from sd35fp8.step_cache import StepCache, extrapolate
from sd35fp8.pipeline import SD35Pipeline, shipped_model_path
from sd35fp8.tiny import detector, world
from sd35fp8.tiny.evaluate import psnr

from faster import render  # benchmarks/faster.py: the same batches and seeds as faster.py tiny

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
N, STEPS = int(sys.argv[1]), int(sys.argv[4]) if len(sys.argv) > 4 else 20
PATTERNS = {  # F full, S skip, one char per call
    "alt": "FF" + "SF" * 9,
    "warm6_ssf": "FFFFFF" + "SSF" * 4 + "SF",
    "warm4": "FFFF" + "SFSFSSFSSFSSFSF"[:15] + "F",
}
def policy2(n, warm=0.2, a=0.4, b=0.85, tail2=False):
    out, skips = [], 0
    for i in range(n):
        if i < max(round(warm * n), 2) or i == n - 1 or (tail2 and i == n - 2):
            out.append("F"); skips = 0; continue
        limit = 1 if i < a * n else (2 if i < b * n else 1)
        if skips < limit:
            out.append("S"); skips += 1
        else:
            out.append("F"); skips = 0
    return "".join(out)
def policy(n, warm=0.2, half=0.5, run2=2):
    out, skips = [], 0
    w = round(warm * n)
    for i in range(n):
        if i < max(w, 2) or i == n - 1:
            out.append("F"); skips = 0; continue
        limit = 1 if i < half * n else run2
        if skips < limit:
            out.append("S"); skips += 1
        else:
            out.append("F"); skips = 0
    return "".join(out)
PATTERNS["g1"] = policy2(STEPS)
PATTERNS["g1t2"] = policy2(STEPS, tail2=True)
PATTERNS["mid50"] = policy(STEPS)
PATTERNS["mid40"] = policy(STEPS, half=0.4)
PATTERNS["warm3mid50"] = policy(STEPS, warm=0.15)
PATTERNS["alt"] = policy(STEPS, warm=0.0, half=2.0)
PATTERNS = {k: v for k, v in PATTERNS.items() if len(v) == STEPS}
for k, v in PATTERNS.items(): print(k, v, v.count("F"), flush=True)

class Pattern(StepCache):
    forecast = "linear"
    pattern = "alt"
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.i = 0
        self.runs = None  # the pattern alone decides (step_cache.RUNS would cap runs of skips)
        if self.forecast in ("linear", "velocity", "x0"):
            self.reuse = self.forecast
        self.hist = []  # (sigma, v float)
    def _pinned(self, s):
        return False
    def _skip(self, st, x, sigma, s, pooled):
        c = self.pattern[self.i]; self.i += 1
        return c == "S"
    def _forecast(self, st, x, sigma, s):
        if self.forecast == "quad" and len(self.hist) >= 3:
            (s2, v2), (s1, v1), (s0, v0) = self.hist[-3], self.hist[-2], self.hist[-1]
            # Lagrange through the last three full calls
            l0 = (s - s1) * (s - s2) / ((s0 - s1) * (s0 - s2))
            l1 = (s - s0) * (s - s2) / ((s1 - s0) * (s1 - s2))
            l2 = (s - s0) * (s - s1) / ((s2 - s0) * (s2 - s1))
            return (l0 * v0 + l1 * v1 + l2 * v2).to(st.velocity.dtype)
        if self.forecast == "damped" and st.prev is not None:
            s0, v0 = st.prev
            return extrapolate(s, st.sigma, st.velocity.float(), s0, v0).mul(0.5).add(st.velocity.float(), alpha=0.5).to(st.velocity.dtype)
        if self.forecast.startswith("corr"):
            self.forecast, f = "linear", self.forecast
            try:
                return super()._forecast(st, x, sigma, s)
            finally:
                self.forecast = f
        return super()._forecast(st, x, sigma, s)
    def _h(self, s):
        sc = self._sched
        for k in range(len(sc) - 1):
            if abs(sc[k] - s) < 1e-7:
                return sc[k + 1] - sc[k]
        raise RuntimeError(s)
    pend = None
    def __call__(self, x, sigma, context, pooled, skip_layers=(), **extra):
        full0 = self.stats["full"]
        v = super().__call__(x, sigma, context, pooled, skip_layers=skip_layers, **extra)
        s = float(sigma.reshape(-1)[0])
        if self.stats["full"] > full0:
            self.hist.append((s, v.float().clone()))
            if self.forecast.startswith("corr") and self.pend is not None and len(self.hist) >= 2:
                sk, vhat = self.pend
                (s0, v0), (s1, v1) = self.hist[-2], self.hist[-1]
                vint = v0 + (sk - s0) / (s1 - s0) * (v1 - v0)
                gain = float(self.forecast[4:] or 1.0)
                v = (v.float() + gain * self._h(sk) / self._h(s) * (vint - vhat)).to(v.dtype)
            self.pend = None
        else:
            self.pend = (s, v.float().clone())
        return v

pipe = SD35Pipeline.from_pretrained(shipped_model_path(), device=torch.device("cpu"))
items = world.eval_items(N, seed=0)
def run(th):
    imgs, stats, _ = render(pipe, items, STEPS, th, "euler", seed=0, batch=16)
    return imgs, stats["calls"] / max(stats["full"], 1)
t = time.time()
base, _ = run(0.0)
bs = detector.aggregate(detector.score_many(base, items))["overall"]
print(f"uncached score {100*bs:.1f} ({time.time()-t:.0f} s)", flush=True)
variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["error:linear"]
res = {}
for var in variants:
    pat, fc = var.split(":")
    th = 0.2
    if pat.startswith("error"):
        parts = pat.split("@")  # error@WARMUP@THRESHOLD
        step_cache.WARMUP = float(parts[1]) if len(parts) > 1 else 0.0
        th = float(parts[2]) if len(parts) > 2 else 0.2
        generation.StepCache = StepCache; step_cache.REUSE = fc
    else:
        Pattern.pattern, Pattern.forecast = PATTERNS[pat], fc
        generation.StepCache = Pattern
    imgs, ratio = run(th)
    sc = detector.aggregate(detector.score_many(imgs, items))["overall"]
    ps = [min(psnr(a, b), 100.0) for a, b in zip(imgs, base)]
    res[var] = dict(ratio=ratio, psnr=float(np.mean(ps)), delta=100 * (sc - bs))
    print(var, res[var], flush=True)
out = Path(__file__).parent / "results" / f"cache_placement_{N}_{STEPS}_cpu.json"
out.write_text(json.dumps({"n": N, "steps": STEPS, "sampler": "euler", "patterns": PATTERNS, "rows": res}, indent=1))
print(f"wrote {out}")
