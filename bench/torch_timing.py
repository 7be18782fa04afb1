"""How every PyTorch baseline in bench/ times (the C++ benchmarks do the same: bench/cuda_timing.h).

  1. warm-up: `warmup` iterations, untimed, then one device synchronisation;
  2. `iters` iterations back to back on the current stream, with no host synchronisation between
     them: one CUDA event before the first and one after the last; the result is
     elapsed / iters (the mean). A step may mark phase boundaries (forward | backward | ...):
     each mark records one more event in the stream, and the phase times are the means over the
     iterations of the time between consecutive marks;
  3. inputs rotated: iteration i uses input set i % sets, with sets = rotation_sets(bytes of one
     set) = max(2, ceil(4 · L2 / bytes)) pre-allocated sets, so that the inputs of one iteration
     are not still in the L2 cache when they are read again (4 times the L2 is read in between);
  4. optionally (graph=True, steps without phase marks and without host synchronisation) the
     `iters` iterations are captured once into a CUDA graph and the timed region is one replay.

What an iteration itself synchronises (e.g. a dispatcher that copies its row counts to the host)
stays in it: that is part of the algorithm being measured, not of the timing.
"""
import math
import time

import torch

L2_FALLBACK_BYTES = 50 * 2 ** 20  # H100 / H200
L2_FACTOR = 4


def l2_bytes(device=None):
    """The L2 cache size of `device` (the current CUDA device by default)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return L2_FALLBACK_BYTES
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or L2_FALLBACK_BYTES)


def tensor_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def rotation_sets(bytes_per_set, device=None):
    """Input sets to cycle through: enough that L2_FACTOR x the L2 is read between two reads of
    one set, and at least 2 (the same bytes are never read by two consecutive iterations)."""
    return max(2, math.ceil(L2_FACTOR * l2_bytes(device) / max(1, bytes_per_set)))


class Timing:
    """ms: mean time per iteration; parts: mean ms of each phase (len = marks + 1)."""

    def __init__(self, ms, parts, iters, warmup, sets, graph):
        self.ms, self.parts, self.iters, self.warmup, self.sets, self.graph = ms, parts, iters, warmup, sets, graph


def method(iters, warmup, graph=False):
    """The banner line of a table: how its numbers were taken."""
    return (f"mean of {iters} back-to-back iterations between two CUDA events after {warmup} warm-up"
            f"{' (one CUDA graph replay)' if graph else ''}; inputs rotated over max(2, ceil({L2_FACTOR} x L2 / "
            f"bytes per set)) sets")


def step_method(steps, warmup):
    """The banner line of a training-step table (no input rotation: see time_loop's callers)."""
    return f"mean of {steps} back-to-back steps between two CUDA events after {warmup} warm-up"


class _Marks:
    """Events (or host clock readings on the CPU) recorded in stream order."""

    def __init__(self, cuda, n):
        self.cuda = cuda
        self.ev = [torch.cuda.Event(enable_timing=True) for _ in range(n)] if cuda else [0.0] * n
        self.k = 0

    def __call__(self):
        if self.cuda:
            self.ev[self.k].record()
        else:
            self.ev[self.k] = time.perf_counter()
        self.k += 1

    def ms(self, a, b):
        if self.cuda:
            return self.ev[a].elapsed_time(self.ev[b])
        return (self.ev[b] - self.ev[a]) * 1e3


def _no_mark():
    pass


def time_loop(step, iters, warmup, sets=1, marks=0, graph=False, cuda=True, before_timed=None):
    """Times step(i, mark) as the module docstring says. step uses input set i % sets and calls
    mark() exactly `marks` times per iteration (at its phase boundaries). before_timed(), when
    given, runs after the warm-up's synchronisation, right before the timed loop (a barrier for
    the distributed baselines). cuda=False: host clock, synchronous CPU ops (the development mode
    of the distributed scripts; its times mean nothing). Returns a Timing."""
    assert iters >= 1 and warmup >= 0 and marks >= 0
    if graph:
        assert cuda and marks == 0, "CUDA-graph timing: CUDA only, no phase marks"
        return _time_graph(step, iters, warmup, sets, before_timed)
    for i in range(warmup):
        step(i, _no_mark)
    if cuda:
        torch.cuda.synchronize()
    if before_timed:
        before_timed()
    per = marks + 1  # events per iteration: its start and its marks
    m = _Marks(cuda, iters * per + 1)
    for i in range(iters):
        m()  # start of iteration i = end of iteration i - 1
        step(warmup + i, m)
        assert m.k == (i + 1) * per, f"step called mark() {m.k - i * per - 1} times, expected {marks}"
    m()
    if cuda:
        torch.cuda.synchronize()
    ms = m.ms(0, iters * per) / iters
    parts = [sum(m.ms(i * per + p, i * per + p + 1) for i in range(iters)) / iters for p in range(per)]
    return Timing(ms, parts, iters, warmup, sets, False)


def _time_graph(step, iters, warmup, sets, before_timed):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for i in range(max(1, warmup)):
            step(i, _no_mark)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            step(warmup + i, _no_mark)
    g.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    if before_timed:
        before_timed()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    stop.record()
    stop.synchronize()
    ms = start.elapsed_time(stop) / iters
    del g
    return Timing(ms, [ms], iters, warmup, sets, True)
