#!/usr/bin/env python3
"""PyTorch SDPA peers of cuda-driver/examples/bench.rs, on the same shapes.

bf16, B*N = 65536, H*D = 2048, D in {64, 128}, N in {1024, 4096, 16384},
causal and not; torch.nn.functional.scaled_dot_product_attention with the
FlashAttention-2 backend (SDPBackend.FLASH_ATTENTION) and the cuDNN backend
(SDPBackend.CUDNN_ATTENTION). Inputs are random normal, laid out
[B, N, H, D] in memory like ours and passed as [B, H, N, D] views.
Timing: CUDA events after warm-up, median of the repetitions.
Effective TFLOP/s = 4*B*H*N^2*D / time, halved for causal.

With --ours PATH (the JSON lines of `bench --json PATH`), prints the joint
table: TFLOP/s of every variant and the ratios to FA2 and cuDNN.
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

TOKENS, WIDTH = 65536, 2048


def timed(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        ms.append(start.elapsed_time(stop))
    return statistics.median(ms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", help="JSON lines written by bench --json")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    ours = {}
    if args.ours:
        with open(args.ours) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    ours[(r["d"], r["n"], r["causal"])] = r

    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    dims = [128] if args.quick else [64, 128]
    lens = [4096] if args.quick else [1024, 4096, 16384]
    rows = []
    for d in dims:
        for n in lens:
            for causal in (False, True):
                b, h = TOKENS // n, WIDTH // d
                gen = torch.Generator(device="cuda").manual_seed(n * 1000 + d)
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
                           for _ in range(3))
                flops = 4.0 * b * h * n * n * d / (2.0 if causal else 1.0)
                res = {}
                for name, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with sdpa_kernel(backend):
                            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                       args.warmup, args.reps)
                        res[name] = flops / (ms * 1e-3) / 1e12
                    except RuntimeError as e:  # backend unavailable for this shape
                        print(f"{name} D={d} N={n} causal={causal}: {str(e).splitlines()[0]}", file=sys.stderr)
                        res[name] = float("nan")
                del q, k, v
                torch.cuda.empty_cache()
                r = ours.get((d, n, causal))
                tf = (lambda key: flops / (r[key] * 1e-3) / 1e12) if r else (lambda key: float("nan"))
                row = dict(d=d, n=n, causal=causal, fa2=res["fa2"], cudnn=res["cudnn"],
                           g1=tf("g1_ms"), g2=tf("g2_ms"), g4=tf("g4_ms"),
                           g2t=tf("g2_total_ms"), g4t=tf("g4_total_ms"), g2l64=tf("g2_l64_ms"),
                           mma1=tf("mma_g1_ms") if r and "mma_g1_ms" in r else float("nan"),
                           mma2=tf("mma_g2_ms") if r and "mma_g2_ms" in r else float("nan"),
                           mma4=tf("mma_g4_ms") if r and "mma_g4_ms" in r else float("nan"),
                           plan_pct=(100.0 * r["plan_ms"] / r["g2_ms"]) if r else float("nan"))
                rows.append(row)
                print(json.dumps(row), flush=True)

    print()
    print("Effective TFLOP/s (4*B*H*N^2*D / time, halved for causal), bf16, B*N=65536, H*D=2048; "
          "ours: block_rows 128, P 16, Mean; '+pl' includes the plan kernel; 'mma' = the mma.sync kernel")
    hdr = ("| D | N | causal | FA2 | cuDNN | G=1 | G=2 | G=2+pl | G=4 | G=4+pl | mma G=1 | mma G=2 | mma G=4 "
           "| G=2 l64 | plan % of G=2 | G=1/FA2 | G=1/cuDNN | G=2+pl/FA2 | G=2+pl/cuDNN | G=4+pl/cuDNN |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        print(f"| {r['d']} | {r['n']} | {'yes' if r['causal'] else 'no'} | {r['fa2']:.0f} | {r['cudnn']:.0f} "
              f"| {r['g1']:.0f} | {r['g2']:.0f} | {r['g2t']:.0f} | {r['g4']:.0f} | {r['g4t']:.0f} "
              f"| {r['mma1']:.0f} | {r['mma2']:.0f} | {r['mma4']:.0f} | {r['g2l64']:.0f} "
              f"| {r['plan_pct']:.1f} | {r['g1'] / r['fa2']:.2f} | {r['g1'] / r['cudnn']:.2f} | {r['g2t'] / r['fa2']:.2f} "
              f"| {r['g2t'] / r['cudnn']:.2f} | {r['g4t'] / r['cudnn']:.2f} |")


if __name__ == "__main__":
    main()
