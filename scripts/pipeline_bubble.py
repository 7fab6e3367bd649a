#!/usr/bin/env python3
"""Pipeline bubble measured from the per-rank Chrome traces of one profiled step (titan writes
rankR_trace.json for every rank), to set beside `titan_train schedule`'s prediction.

Per rank, the pipeline part of the step is the GPU work launched by the schedule's executor:
kernels whose launch (CPU time, matched by correlation id) falls between the first
"titan/forward" scope and the "titan/grad_reduction_wait" scope that follows the executor
(without those scopes: up to the first AdamW kernel, with a warning). Compute kernels are all
but NCCL's: a rank waiting in a receive is idle. Printed, as the simulator defines them:
  bubble: idle between a rank's first and last pipeline kernel, worst rank;
  step idle: 1 - busy / (ranks x pipeline span), the span from the first rank's first kernel to
  the last rank's last one.
The simulator gives every stage the same cost; the first and last ranks also run the embedding
and the output/loss, so expect a gap from that alone.
Usage: scripts/pipeline_bubble.py TRACE_FOLDER [RANKS]"""
import glob, json, os, re, sys

COMM = re.compile(r"nccl", re.I)
OPTIMIZER = re.compile(r"adamw_kernel|fused_adam", re.I)


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
    """(start, end, busy) of the rank's pipeline kernels in trace time (us), or None."""
    events = json.load(open(path))["traceEvents"]
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"
               and not COMM.search(e["name"])]
    if not kernels:
        return None
    scopes = [e for e in events if e.get("cat") == "user_annotation"]
    first = min((e["ts"] for e in scopes if e["name"] == "titan/forward"), default=None)
    after = min((e["ts"] for e in scopes
                 if e["name"] == "titan/grad_reduction_wait" and first is not None
                 and e["ts"] > first), default=None)
    if first is not None and after is not None:
        launch = {e["args"]["correlation"]: e["ts"] for e in events
                  if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
        pipeline = [(e["ts"], e["ts"] + e["dur"]) for e in kernels
                    if first <= launch.get(e.get("args", {}).get("correlation"), -1) < after]
    else:
        print(f"warning: {os.path.basename(path)} has no titan/forward and "
              f"titan/grad_reduction_wait scopes; the pipeline part ends at the first AdamW kernel")
        kernels.sort(key=lambda e: e["ts"])
        end = next((e["ts"] for e in kernels if OPTIMIZER.search(e["name"])),
                   max(e["ts"] + e["dur"] for e in kernels))
        pipeline = [(e["ts"], min(e["ts"] + e["dur"], end)) for e in kernels if e["ts"] < end]
    if not pipeline:
        return None
    return min(a for a, _ in pipeline), max(b for _, b in pipeline), union_length(pipeline)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    folder = sys.argv[1]
    expected = int(sys.argv[2]) if len(sys.argv) > 2 else None
    rank_of = lambda p: int(re.match(r"rank(\d+)_", os.path.basename(p)).group(1))
    paths = sorted(glob.glob(os.path.join(folder, "rank*_trace.json")), key=rank_of)
    if not paths:
        sys.exit(f"no rank*_trace.json in {folder}")
    windows = {}
    for p in paths:
        w = rank_window(p)
        if w:
            windows[rank_of(p)] = w
        else:
            print(f"warning: no pipeline kernels in {p}")
    if expected is not None and len(windows) != expected:
        print(f"warning: {len(windows)} of {expected} ranks have pipeline kernels")
    if not windows:
        sys.exit(f"no GPU kernels in {folder}")
    first = min(w[0] for w in windows.values())
    last = max(w[1] for w in windows.values())
    bubbles, idles = [], []
    for r, (start, end, busy) in sorted(windows.items()):
        bubbles.append(1 - busy / (end - start))
        idles.append(1 - busy / (last - first))
        print(f"rank {r}: pipeline part {(end - start) / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, "
              f"bubble {100 * bubbles[-1]:.2f}%, idle over the span {100 * idles[-1]:.2f}%")
    print(f"measured: bubble {100 * max(bubbles):.2f}% (worst rank); step idle "
          f"{100 * sum(idles) / len(idles):.2f}% (mean over {len(idles)} ranks); pipeline span "
          f"{(last - first) / 1e3:.1f} ms")


if __name__ == "__main__":
    main()
