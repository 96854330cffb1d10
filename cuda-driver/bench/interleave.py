"""Interleaved timing for the Python benchmarks (ctypes_bench.py,
autograd_bench.py --bar): every variant of a shape takes turns, one timed
call each per round in a rotating order, so that the GPU's clock and
temperature drift under load (1.5-1.85 GHz on the H100 in these runs) falls
on every variant alike."""
import statistics

import torch


def timed_together(fns, warmup, reps, sleep_cycles):
    """Median milliseconds of each of `fns` (name -> callable) between CUDA
    events: `warmup` calls each in the given order, then `reps` rounds of one
    timed call each, the order rotating per round. Before each timed call the
    GPU spins for `sleep_cycles` (torch.cuda._sleep) so that host-side launch
    overhead is not counted."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    names = list(fns)
    ms = {name: [] for name in names}
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            torch.cuda.synchronize()
            torch.cuda._sleep(sleep_cycles)
            start.record()
            fns[name]()
            stop.record()
            stop.synchronize()
            ms[name].append(start.elapsed_time(stop))
    return {name: statistics.median(v) for name, v in ms.items()}
