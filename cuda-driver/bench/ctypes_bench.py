#!/usr/bin/env python3
"""DistrAttention through the C ABI (ctypes, da_cuda_*) on torch CUDA tensors,
against torch.nn.functional.scaled_dot_product_attention with the
FlashAttention-2 (SDPBackend.FLASH_ATTENTION) and cuDNN
(SDPBackend.CUDNN_ATTENTION) backends, in one process on the same inputs.

Shapes: bf16, B*N = 65536, H*D = 2048, D in {64, 128}, N in {1024, 4096,
16384}, causal and not. Inputs are random normal laid out [B, N, H, D] (ours
reads them as they are; SDPA gets the [B, H, N, D] views). Ours: block_rows
128, P = 16, Mean fusion, output bf16; G = 1 is da_cuda_exact_attention, G = 2
and 4 are timed as the plan alone (da_cuda_plan), the attention on that plan
(da_cuda_attention) and the one-shot da_cuda_forward (plan + attention, plan
in a stream-ordered workspace).

Timing: CUDA events on the current stream after warm-up, medians of the
repetitions; the variants of a shape (FA2, cuDNN and ours) take turns, one
timed call each per round in a rotating order, so that the GPU's clock and
temperature drift (its SM clock under these loads was seen between 1.5 and
1.85 GHz) falls on every variant alike; before each timed call the GPU is
kept busy (torch.cuda._sleep) so that host-side launch overhead (ctypes,
argument checks, Python) is not counted for any variant; that overhead is
measured on its own (host time per call). Effective TFLOP/s = 4*B*H*N^2*D / time, halved for causal, the same
count for every G.

Accuracy: relative Frobenius error of every output against FA2's over the
whole output, and against an f32 reference (torch matmul + softmax in f32)
on batch 0, heads 0 and 1.

    DA_LIBRARY=.../libdistr_attention.so python3 cuda-driver/bench/ctypes_bench.py --out DIR [--quick]

Writes DIR/ctypes_bench.json (one object) and DIR/ctypes_bench.md (tables).
"""
import argparse
import ctypes
import json
import math
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

TOKENS, WIDTH = 65536, 2048
SLEEP_CYCLES = 2_000_000  # about 1 ms of GPU spinning ahead of each timed call


def host_us(fn, calls=20):
    """Median host microseconds per call (the GPU kept busy, nothing waited for)."""
    torch.cuda.synchronize()
    us = []
    for _ in range(calls):
        torch.cuda._sleep(SLEEP_CYCLES)
        t0 = time.perf_counter()
        fn()
        us.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(us)


class Ours:
    """Prebuilt C arguments for one problem: the ctypes calls carry no Python work."""

    def __init__(self, q, k, v, out, causal, group_size):
        self.lib = da.library()
        self.config = da.Config(block_rows=128, group_size=group_size, causal=causal)
        self.c, self._keep = self.config._c()
        self.t = [da._describe_torch(x, n, device_ok=True) for x, n in ((q, "q"), (k, "k"), (v, "v"), (out, "out"))]
        self.refs = [ctypes.byref(t) for t in self.t]
        self.handle = da._cuda_context(None, q.device)
        self.stream = da._stream(torch, q.device)
        s = da.plan_shape(tuple(q.shape), self.config)
        self.plan = torch.empty(s["num_entries"], dtype=torch.int16, device=q.device)
        self.entries = s["num_entries"]

    def check(self, status):
        if status != 0:
            raise da.DistrAttentionError(status, self.lib.da_last_error_message().decode())

    def exact(self):
        self.check(self.lib.da_cuda_exact_attention(self.handle, ctypes.byref(self.c), *self.refs, None, 0,
                                                    self.stream))

    def plan_only(self):
        self.check(self.lib.da_cuda_plan(self.handle, ctypes.byref(self.c), self.refs[0], self.plan.data_ptr(),
                                         self.entries, self.stream))

    def attention(self):
        self.check(self.lib.da_cuda_attention(self.handle, ctypes.byref(self.c), self.plan.data_ptr(), self.entries,
                                              *self.refs, None, 0, self.stream))

    def forward(self):
        self.check(self.lib.da_cuda_forward(self.handle, ctypes.byref(self.c), *self.refs, None, 0, None, 0,
                                            self.stream))


def reference_slice(q, k, v, causal, heads=(0, 1)):
    """f32 exact attention of batch 0 on `heads`: [N, len(heads), D]."""
    outs = []
    n, d = q.shape[1], q.shape[3]
    for h in heads:
        qh, kh, vh = (x[0, :, h].float() for x in (q, k, v))
        s = (qh @ kh.T) / math.sqrt(d)
        if causal:
            s.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
        outs.append(torch.softmax(s, dim=-1) @ vh)
        del s
    return torch.stack(outs, dim=1)


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    dev = torch.cuda.get_device_name()
    meta = dict(device=dev, torch=torch.__version__, cudnn=torch.backends.cudnn.version(), library=da.version(),
                cuda_built=da.cuda_built(), warmup=args.warmup, reps=args.reps, block_rows=128, num_projections=16)
    print(json.dumps(meta), flush=True)
    dims = [128] if args.quick else [64, 128]
    lens = [4096] if args.quick else [1024, 4096, 16384]
    rows, host = [], {}
    for d in dims:
        for n in lens:
            for causal in (False, True):
                b, h = TOKENS // n, WIDTH // d
                gen = torch.Generator(device="cuda").manual_seed(n * 1000 + d)
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                           for _ in range(3))
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                flops = 4.0 * b * h * n * n * d / (2.0 if causal else 1.0)
                tflops = lambda ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
                row = dict(d=d, n=n, b=b, h=h, causal=causal)
                # Every variant of this shape, timed together (plans before the attentions that read them).
                fns, outs, ours = {}, {}, {}
                for name, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def call(backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                    try:
                        outs[name] = call().transpose(1, 2)
                        fns[name] = call
                    except RuntimeError as e:  # backend unavailable for this shape
                        print(f"{name} D={d} N={n} causal={causal}: {str(e).splitlines()[0]}", file=sys.stderr)
                        row[f"{name}_ms"] = float("nan")
                for g in (1, 2, 4):
                    outs[f"g{g}"] = torch.empty_like(q)
                    o = ours[g] = Ours(q, k, v, outs[f"g{g}"], causal, g)
                    if g == 1:
                        fns["g1"] = o.exact
                    else:
                        fns[f"g{g}_plan"], fns[f"g{g}_attn"], fns[f"g{g}_fwd"] = o.plan_only, o.attention, o.forward
                for name, ms in timed_together(fns, args.warmup, args.reps, SLEEP_CYCLES).items():
                    row[f"{name}_ms"] = ms
                for g, o in ours.items():  # each output once more, for the accuracy columns
                    if g == 1:
                        o.exact()
                    else:
                        o.forward()
                if "fa2" in fns and "sdpa_fa2_us" not in host:
                    host["sdpa_fa2_us"] = host_us(fns["fa2"])
                if "ctypes_forward_us" not in host:
                    host["ctypes_forward_us"] = host_us(ours[2].forward)
                    host["module_forward_us"] = host_us(lambda: da.forward(q, k, v, ours[2].config))
                    host["at"] = dict(d=d, n=n, causal=causal)
                del ours, fns
                torch.cuda.synchronize()
                ref = reference_slice(q, k, v, causal)
                for name, out in outs.items():
                    row[f"{name}_err_fa2"] = rel(out, outs["fa2"]) if "fa2" in outs else float("nan")
                    row[f"{name}_err_f32"] = rel(out[0, :, :2], ref)
                for key in [k_ for k_ in row if k_.endswith("_ms")]:
                    row[key.replace("_ms", "_tflops")] = tflops(row[key])
                rows.append(row)
                print(json.dumps(row), flush=True)
                del q, k, v, qt, kt, vt, outs, ref
                torch.cuda.empty_cache()

    result = dict(meta=meta, host_us=host, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ctypes_bench.json"), "w") as f:
        json.dump(result, f, indent=1)

    lines = [f"# DistrAttention via the C ABI (ctypes) vs PyTorch SDPA, {dev}", "",
             f"torch {meta['torch']}, cuDNN {meta['cudnn']}, libdistr_attention {meta['library']}; "
             f"medians of {args.reps} rounds after {args.warmup} warm-up calls, every variant of a shape once per "
             "round in a rotating order, CUDA events, launch overhead hidden. "
             "Effective TFLOP/s = 4*B*H*N^2*D / time (halved for causal), bf16, B*N = 65536, H*D = 2048; ours: "
             "block_rows 128, P 16, Mean, bf16 output. G=k fwd = da_cuda_forward (plan + attention); "
             "plan and attn are the two parts timed alone.", "",
             "| D | N | causal | FA2 | cuDNN | G=1 | G=2 attn | G=2 fwd | G=4 attn | G=4 fwd | plan G=2 ms | "
             "plan % of G=2 fwd | G=1/FA2 | G=2 fwd/FA2 | G=2 fwd/cuDNN | G=4 fwd/FA2 |",
             "|" + "---|" * 16]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['n']} | {'yes' if r['causal'] else 'no'} | {r['fa2_tflops']:.0f} | "
            f"{r['cudnn_tflops']:.0f} | {r['g1_tflops']:.0f} | {r['g2_attn_tflops']:.0f} | {r['g2_fwd_tflops']:.0f} | "
            f"{r['g4_attn_tflops']:.0f} | {r['g4_fwd_tflops']:.0f} | {r['g2_plan_ms']:.3f} | "
            f"{100 * r['g2_plan_ms'] / r['g2_fwd_ms']:.1f} | {r['g1_tflops'] / r['fa2_tflops']:.2f} | "
            f"{r['g2_fwd_tflops'] / r['fa2_tflops']:.2f} | {r['g2_fwd_tflops'] / r['cudnn_tflops']:.2f} | "
            f"{r['g4_fwd_tflops'] / r['fa2_tflops']:.2f} |")
    lines += ["", "Relative error (Frobenius) vs FA2's output (whole tensor) / vs an f32 reference "
              "(batch 0, heads 0-1):", "",
              "| D | N | causal | FA2 vs f32 | cuDNN | G=1 | G=2 | G=4 |", "|" + "---|" * 8]
    for r in rows:
        cell = lambda name: f"{r[f'{name}_err_fa2']:.2e} / {r[f'{name}_err_f32']:.2e}"  # noqa: E731
        lines.append(f"| {r['d']} | {r['n']} | {'yes' if r['causal'] else 'no'} | {r['fa2_err_f32']:.2e} | "
                     f"{cell('cudnn')} | {cell('g1')} | {cell('g2')} | {cell('g4')} |")
    if host:
        lines += ["", f"Host time per call (median, us) at D={host['at']['d']} N={host['at']['n']} "
                  f"causal={host['at']['causal']}: raw ctypes da_cuda_forward {host['ctypes_forward_us']:.1f}, "
                  f"distr_attention.forward (module) {host['module_forward_us']:.1f}, "
                  f"SDPA FA2 {host['sdpa_fa2_us']:.1f}."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "ctypes_bench.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
