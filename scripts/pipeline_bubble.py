#!/usr/bin/env python3
"""Pipeline bubble measured from the per-rank Chrome traces of one profiled step (titan writes
rankR_trace.json for every rank), to set beside `titan_train schedule`'s prediction.

Per rank, the pipeline part of the step runs from its first compute kernel to the start of its
optimizer (the first AdamW kernel; the last kernel when there is none). Compute kernels are all
GPU kernels except NCCL's (a rank waiting in a receive is idle). Printed, like the simulator:
  bubble: idle between a rank's first and last pipeline kernel, worst rank;
  step idle: idle over the whole pipeline part of the step (first start to last end over all
  ranks), mean over ranks.
Usage: scripts/pipeline_bubble.py TRACE_FOLDER [--steps N]"""
import glob, json, os, re, sys

COMM = re.compile(r"nccl", re.I)
OPTIMIZER = re.compile(r"adam|multi_tensor_apply", re.I)


def union_length(intervals):
    total, cur = 0.0, None
    for a, b in sorted(intervals):
        if cur is None or a > cur[1]:
            if cur:
                total += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    if cur:
        total += cur[1] - cur[0]
    return total


def rank_window(path):
    events = json.load(open(path))["traceEvents"]
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"),
                     key=lambda e: e["ts"])
    compute = [e for e in kernels if not COMM.search(e["name"])]
    if not compute:
        return None
    end = next((e["ts"] for e in compute if OPTIMIZER.search(e["name"])),
               max(e["ts"] + e["dur"] for e in compute))
    pipeline = [(e["ts"], min(e["ts"] + e["dur"], end)) for e in compute if e["ts"] < end]
    start = pipeline[0][0]
    return start, end, union_length(pipeline)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    folder = sys.argv[1]
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 1
    paths = sorted(glob.glob(os.path.join(folder, "rank*_trace.json")),
                   key=lambda p: int(re.search(r"rank(\d+)_", p).group(1)))
    windows = {}
    for p in paths:
        w = rank_window(p)
        if w:
            windows[int(re.search(r"rank(\d+)_", p).group(1))] = w
    if not windows:
        print("no GPU kernels in", folder)
        return
    first = min(w[0] for w in windows.values())
    last = max(w[1] for w in windows.values())
    bubbles, idles = [], []
    for r, (start, end, busy) in sorted(windows.items()):
        bubble = 1 - busy / (end - start)
        idle = 1 - busy / (last - first)
        bubbles.append(bubble)
        idles.append(idle)
        print(f"rank {r}: pipeline part {(end - start) / 1e3 / steps:.1f} ms/step, busy "
              f"{busy / 1e3 / steps:.1f} ms/step, bubble {100 * bubble:.2f}%, idle over the step "
              f"{100 * idle:.2f}%")
    print(f"measured: bubble {100 * max(bubbles):.2f}% (worst rank); step idle "
          f"{100 * sum(idles) / len(idles):.2f}% (mean over {len(idles)} ranks); pipeline part "
          f"{(last - first) / 1e3 / steps:.1f} ms/step")


if __name__ == "__main__":
    main()
