#!/usr/bin/env python3
"""Summary of a CUDA caching-allocator snapshot written by titan (profiling.enable_memory_snapshot,
the pickle format of torch.cuda.memory._snapshot): reserved / allocated bytes now, the peak of
allocated bytes over the recorded history, and the blocks live at that peak grouped by size
(persistent state vs. transient buffers). Open the same file in https://pytorch.org/memory_viz
for the full timeline. Usage: scripts/snapshot_summary.py SNAPSHOT.pickle [--top N]"""
import pickle, sys
from collections import Counter

GiB = 1024 ** 3

def main():
    path = sys.argv[1]
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 15
    snap = pickle.load(open(path, "rb"))
    segments = snap["segments"]
    reserved = sum(s["total_size"] for s in segments)
    live = {}  # address -> size, as of the snapshot
    for s in segments:
        for b in s["blocks"]:
            if b["state"] == "active_allocated":
                live[b["address"]] = b["size"]
    allocated = sum(live.values())
    print(f"snapshot: {len(segments)} segments, reserved {reserved / GiB:.2f} GiB, "
          f"allocated {allocated / GiB:.2f} GiB in {len(live)} blocks")
    traces = [t for t in snap.get("device_traces", []) if t]
    if not traces:
        print("no allocation history recorded"); return
    trace = traces[0]
    # Replay backwards from the snapshot to the start of the history, then forwards to the peak.
    state = dict(live)
    for e in reversed(trace):
        if e["action"] == "alloc":
            state.pop(e["addr"], None)
        elif e["action"] == "free_requested":
            state[e["addr"]] = e["size"]
    cur = sum(state.values()); peak, peak_i = cur, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            state[e["addr"]] = e["size"]; cur += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in state:
            cur -= state.pop(e["addr"])
        if cur > peak:
            peak, peak_i = cur, i
    # Blocks live at the peak: undo the events after it, starting from the snapshot.
    at_peak = dict(live)
    for e in reversed(trace[peak_i + 1:]):
        if e["action"] == "alloc":
            at_peak.pop(e["addr"], None)
        elif e["action"] == "free_requested":
            at_peak[e["addr"]] = e["size"]
    first_us = trace[0].get("time_us", 0)
    when = trace[peak_i].get("time_us", first_us) - first_us if peak_i >= 0 else 0
    print(f"history: {len(trace)} events; peak allocated {peak / GiB:.2f} GiB "
          f"({when / 1e3:.1f} ms after the first recorded event)")
    sizes = Counter()
    counts = Counter()
    for sz in at_peak.values():
        key = sz if sz >= 1 << 20 else 0  # small blocks pooled together
        sizes[key] += sz; counts[key] += 1
    print(f"blocks live at the peak, by size (top {top}):")
    print(f"  {'block MiB':>10s} {'count':>6s} {'total GiB':>10s}")
    for key, total in sorted(sizes.items(), key=lambda kv: -kv[1])[:top]:
        label = f"{key / 2**20:10.1f}" if key else "    < 1.0"
        print(f"  {label} {counts[key]:6d} {total / GiB:10.2f}")

if __name__ == "__main__":
    main()
