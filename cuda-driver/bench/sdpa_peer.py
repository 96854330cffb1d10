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

With --backward (pair with `bench --backward --json PATH`): training steps
on N in {1024, 4096}: the forward alone and forward + backward through
torch.autograd.grad(out, (q, k, v), dO) for both backends (bf16 gradients),
against ours (G=1 forward + backward, G=2 plan + forward + backward);
times in ms and speed ratios (peer ms / ours ms: above 1, ours is faster).
Effective TFLOP/s = 14*B*H*N^2*D / time, halved for causal.
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
    ap.add_argument("--backward", action="store_true")
    args = ap.parse_args()
    if args.backward:
        backward_main(args)
        return

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


def backward_main(args):
    ours = {}
    if args.ours:
        with open(args.ours) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    ours[(r["d"], r["n"], r["causal"])] = r
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    dims = [128] if args.quick else [64, 128]
    lens = [4096] if args.quick else [1024, 4096]
    rows = []
    for d in dims:
        for n in lens:
            for causal in (False, True):
                b, h = TOKENS // n, WIDTH // d
                gen = torch.Generator(device="cuda").manual_seed(n * 1000 + d + 7)
                base = [torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
                        for _ in range(3)]
                q, k, v = (x.transpose(1, 2) for x in base)
                d_out = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
                flops = 14.0 * b * h * n * n * d / (2.0 if causal else 1.0)
                res = {}
                for name, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with sdpa_kernel(backend):
                            with torch.no_grad():
                                fwd = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                            args.warmup, args.reps)
                            step = timed(lambda: torch.autograd.grad(
                                F.scaled_dot_product_attention(q, k, v, is_causal=causal), base, d_out),
                                args.warmup, args.reps)
                        res[name] = (fwd, step)
                    except RuntimeError as e:  # backend unavailable for this shape
                        print(f"{name} D={d} N={n} causal={causal}: {str(e).splitlines()[0]}", file=sys.stderr)
                        res[name] = (float("nan"), float("nan"))
                del q, k, v, base, d_out
                torch.cuda.empty_cache()
                r = ours.get((d, n, causal), {})
                nan = float("nan")
                row = dict(d=d, n=n, causal=causal,
                           fa2_fwd=res["fa2"][0], fa2_step=res["fa2"][1],
                           cudnn_fwd=res["cudnn"][0], cudnn_step=res["cudnn"][1],
                           g1_fwd=r.get("g1_fwd_ms", nan), g1_bwd=r.get("g1_bwd_ms", nan), g1_step=r.get("g1_total_ms", nan),
                           g2_fwd=r.get("g2_fwd_ms", nan), g2_bwd=r.get("g2_bwd_ms", nan), g2_step=r.get("g2_total_ms", nan),
                           plan=r.get("plan_ms", nan), tflop=flops / 1e12)
                rows.append(row)
                print(json.dumps(row), flush=True)

    print()
    print("Training step (forward + backward), bf16, B*N=65536, H*D=2048, ms; ours: block_rows 128, P 16, Mean; "
          "G=2 includes the plan; bwd = step - fwd for the peers; ratio = peer ms / ours ms")
    hdr = ("| D | N | causal | FA2 f+b | FA2 bwd | cuDNN f+b | G=1 f+b | G=1 bwd | G=2 p+f+b | G=2 bwd "
           "| G=1/FA2 | G=2/FA2 | G=2/cuDNN | G=2 bwd/FA2 bwd | TFLOP/s FA2 | G=1 | G=2 |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        fa2_bwd = r["fa2_step"] - r["fa2_fwd"]
        tf = lambda ms: r["tflop"] / (ms * 1e-3)
        print(f"| {r['d']} | {r['n']} | {'yes' if r['causal'] else 'no'} | {r['fa2_step']:.2f} | {fa2_bwd:.2f} "
              f"| {r['cudnn_step']:.2f} | {r['g1_step']:.2f} | {r['g1_bwd']:.2f} | {r['g2_step']:.2f} | {r['g2_bwd']:.2f} "
              f"| {r['fa2_step'] / r['g1_step']:.2f} | {r['fa2_step'] / r['g2_step']:.2f} "
              f"| {r['cudnn_step'] / r['g2_step']:.2f} | {fa2_bwd / r['g2_bwd']:.2f} "
              f"| {tf(r['fa2_step']):.0f} | {tf(r['g1_step']):.0f} | {tf(r['g2_step']):.0f} |")


if __name__ == "__main__":
    main()
