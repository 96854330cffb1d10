#!/usr/bin/env python3
"""Forward + backward of one attention call for fine-tuning: the Python
autograd path (distr_attention.distr_attention on torch CUDA tensors, through
the C ABI: da_cuda_forward, then da_cuda_attention_backward) against
torch.nn.functional.scaled_dot_product_attention with the FlashAttention-2
backend (SDPBackend.FLASH_ATTENTION), on the same inputs in one process.

Shape: SmolLM2-135M's attention (9 query heads, 3 KV heads, head_dim 64),
batch 4, N in {256, 2048}, bf16, causal. Inputs are [B, N, H, D] leaves
with requires_grad (ours reads them as they are; SDPA gets the [B, H, N, D]
views, with enable_gqa where the backend takes it, else the KV heads
repeated inside the timed region as a model's repeat_kv does).

Per variant, medians over the repetitions after warm-up, CUDA events:
  step   forward + backward launched on an idle GPU (synchronised before each
         call): what a training step pays, host overhead included;
  gpu    the same with the GPU kept busy ahead of the call
         (torch.cuda._sleep), so host-side launch overhead is hidden: the
         device time of the kernels;
  host   host microseconds to issue forward + backward with the GPU busy.

    DA_LIBRARY=.../libdistr_attention.so python3 cuda-driver/bench/autograd_bench.py [--out FILE]

--bar: instead, issue 7's training-step shapes (bf16, B*N = 65536,
H*D = 2048, N = 4096, D in {128, 64}, causal and not): SDPA's FA2 and cuDNN
backends against ours at G = 1 and G = 2 (l = 128, plan included), device
time of forward + backward (the GPU kept busy ahead of each call), every
variant of a shape taking turns in rotating rounds so that clock drift
under load falls on all of them alike.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import distr_attention as da  # noqa: E402
from interleave import timed_together  # noqa: E402  (beside this file)

SLEEP_CYCLES = 4_000_000  # a few ms of GPU spinning ahead of a timed call


def measure(fn, warmup=5, reps=30):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    step, gpu, host = [], [], []
    for busy in (False, True):
        for _ in range(reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            if busy:
                torch.cuda._sleep(SLEEP_CYCLES)
            start.record()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            stop.record()
            stop.synchronize()
            (gpu if busy else step).append(start.elapsed_time(stop))
            if busy:
                host.append((t1 - t0) * 1e6)
    return statistics.median(step), statistics.median(gpu), statistics.median(host)


def bar(out):
    """--bar: issue 7's shapes, every variant of a shape interleaved."""
    rows = []
    for d, n, causal in ((128, 4096, False), (128, 4096, True), (64, 4096, False), (64, 4096, True)):
        b, h = 65536 // n, 2048 // d
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        d_out = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)

        def sdpa(backend):
            def fn():
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal)
                    out.backward(d_out.transpose(1, 2))
            return fn

        def ours(g):
            cfg = da.Config(group_size=g, causal=causal, block_rows=128)

            def fn():
                da.distr_attention(q, k, v, cfg).backward(d_out)
            return fn

        fns = {"fa2": sdpa(SDPBackend.FLASH_ATTENTION), "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
               "g1": ours(1), "g2": ours(2)}
        ms = timed_together(fns, 3, 15, SLEEP_CYCLES)
        row = dict(d=d, n=n, b=b, h=h, causal=causal, **{f"{k_}_ms": v_ for k_, v_ in ms.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, d_out, fns
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"libdistr_attention {da.version()}: forward + backward device ms (median of 15 interleaved rounds), "
          "bf16, B*N = 65536, H*D = 2048; ours through the autograd Function (G = 2: plan + forward + backward); "
          "ratio = peer ms / ours ms")
    print("| D | N | causal | FA2 | cuDNN | G=1 | G=2 | G=1/FA2 | G=2/FA2 | G=2/cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['d']} | {r['n']} | {'yes' if r['causal'] else 'no'} | {r['fa2_ms']:.2f} | {r['cudnn_ms']:.2f} | "
              f"{r['g1_ms']:.2f} | {r['g2_ms']:.2f} | {r['fa2_ms'] / r['g1_ms']:.2f} | {r['fa2_ms'] / r['g2_ms']:.2f} | "
              f"{r['cudnn_ms'] / r['g2_ms']:.2f} |")
    if out:
        with open(out, "w") as f:
            json.dump({"rows": rows}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--bar", action="store_true", help="issue 7's shapes, variants interleaved")
    args = ap.parse_args()
    if args.bar:
        bar(args.out)
        return
    torch.manual_seed(0)
    B, HQ, HKV, D = 4, 9, 3, 64
    dtype = torch.bfloat16
    rows = []
    for n in (256, 2048):
        q = torch.randn(B, n, HQ, D, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(B, n, HKV, D, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(B, n, HKV, D, device="cuda", dtype=dtype, requires_grad=True)
        d_out = torch.randn(B, n, HQ, D, device="cuda", dtype=dtype)

        def ours(cfg):
            def fn():
                out = da.distr_attention(q, k, v, cfg)
                out.backward(d_out)
            return fn

        gqa = True
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True,
                                               enable_gqa=True).backward(d_out.transpose(1, 2))
        except RuntimeError:
            gqa = False

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                if gqa:
                    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                else:
                    kt, vt = (x.repeat_interleave(HQ // HKV, dim=1) for x in (kt, vt))
                    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
                out.backward(d_out.transpose(1, 2))

        variants = [
            ("SDPA FA2" + ("" if gqa else " (KV repeated)"), sdpa),
            ("ours G=1 (exact)", ours(da.Config(group_size=1, causal=True))),
            ("ours G=2, l=128", ours(da.Config(group_size=2, causal=True, block_rows=128))),
            ("ours G=2, l=64", ours(da.Config(group_size=2, causal=True, block_rows=64))),
        ]
        for name, fn in variants:
            step, gpu, host = measure(fn)
            rows.append({"n": n, "variant": name, "step_ms": step, "gpu_ms": gpu, "host_us": host})
            print(f"N={n:5d} {name:26s} step {step:8.3f} ms  gpu {gpu:8.3f} ms  host {host:8.1f} us", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "library": da.version(),
            "shape": f"B={B}, {HQ} query / {HKV} KV heads, D={D}, bf16, causal"}
    print(f"\n{meta['device']}, torch {meta['torch']}, libdistr_attention {meta['library']}; {meta['shape']}")
    print("| N | variant | fwd+bwd step (ms) | GPU time (ms) | host (us) | step vs FA2 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fa2 = next(x for x in rows if x["n"] == r["n"] and x["variant"].startswith("SDPA"))
        print(f"| {r['n']} | {r['variant']} | {r['step_ms']:.3f} | {r['gpu_ms']:.3f} | {r['host_us']:.0f} | "
              f"{r['step_ms'] / fa2['step_ms']:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
