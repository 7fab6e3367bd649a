#!/usr/bin/env python3
"""Kernel-level breakdown of one profiled step from a titan Chrome trace (Kineto JSON):
GPU time per category (matmul, attention, elementwise/norm, loss, optimizer, communication,
copies), the GPU idle time between kernels (launch gaps), communication time left exposed
(NCCL kernels running while no compute kernel runs), and the top kernels.
With --who REGEX, also which host code launched the kernels whose names match (the enclosing
titan scopes and ATen ops of each launch, by time).
--top N lists N kernels (15 by default).
Usage: scripts/trace_summary.py TRACE.json [--steps N] [--top N] [--who REGEX]"""
import json, re, sys
from collections import defaultdict

CATEGORIES = [
    ("communication", r"nccl|ncclDevKernel|ncclKernel"),
    ("attention", r"flash|fmha|cudnn.*attn|sdpa|attention|cutlass.*fmha|mha"),
    ("matmul", r"gemm|sm90_xmma|cutlass|nvjet|cublas|xmma|matmul|wgmma"),
    ("loss", r"ce_kernel|cross_entropy|log_softmax|nll"),
    ("optimizer", r"adam|multi_tensor_apply|fused_adam"),
    ("norm/rope/swiglu (titan)", r"rmsnorm|rope_kernel|swiglu|sum_partials"),
    ("copies/memset", r"memcpy|memset|Memcpy|Memset|copy_kernel|CatArrayBatched"),
    ("other elementwise/reduce", r"."),
]

def main():
    path = sys.argv[1]
    steps = 1
    if "--steps" in sys.argv:
        steps = int(sys.argv[sys.argv.index("--steps") + 1])
    events = json.load(open(path))["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        print("no GPU events in", path); return
    per_cat = defaultdict(float); per_kernel = defaultdict(lambda: [0.0, 0])
    for e in gpu:
        name = e["name"]
        for cat, pat in CATEGORIES:
            if re.search(pat, name, re.I):
                per_cat[cat] += e["dur"]; break
        k = per_kernel[name[:90]]; k[0] += e["dur"]; k[1] += 1
    # Busy time = union of kernel intervals (streams overlap), span = first start to last end.
    ivs = sorted((e["ts"], e["ts"] + e["dur"]) for e in gpu)
    busy = 0.0; cur_s, cur_e = ivs[0]
    for s, e in ivs[1:]:
        if s > cur_e:
            busy += cur_e - cur_s; cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = ivs[-1][1] - ivs[0][0]
    # Exposed communication: time some NCCL kernel runs while no compute kernel does.
    def union(iv):
        out = []
        for a, b in sorted(iv):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return out
    is_comm = lambda e: re.search(CATEGORIES[0][1], e["name"], re.I)
    comm = union((e["ts"], e["ts"] + e["dur"]) for e in gpu if is_comm(e))
    compute = union((e["ts"], e["ts"] + e["dur"]) for e in gpu if not is_comm(e))
    overlap, j = 0.0, 0
    for a, b in comm:
        while j < len(compute) and compute[j][1] <= a:
            j += 1
        k = j
        while k < len(compute) and compute[k][0] < b:
            overlap += min(b, compute[k][1]) - max(a, compute[k][0])
            k += 1
    comm_total = sum(b - a for a, b in comm)
    total = sum(per_cat.values())
    print(f"profiled steps: {steps}; GPU span {span/1e3/steps:.1f} ms/step, busy {busy/1e3/steps:.1f} ms/step, "
          f"idle (launch gaps / host waits) {(span-busy)/1e3/steps:.1f} ms/step, kernels {len(gpu)//steps}/step")
    if comm:
        print(f"communication: {comm_total/1e3/steps:.1f} ms/step on the GPU, of which exposed "
              f"(no compute kernel running) {(comm_total-overlap)/1e3/steps:.1f} ms/step")
    print(f"{'category':34s} {'ms/step':>9s} {'share':>7s}")
    for cat, _ in CATEGORIES:
        if per_cat[cat]:
            print(f"{cat:34s} {per_cat[cat]/1e3/steps:9.2f} {100*per_cat[cat]/total:6.1f}%")
    print("top kernels (ms/step, calls/step):")
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 15
    for name, (d, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {d/1e3/steps:8.2f} {n//steps:5d}  {name}")

    if "--who" in sys.argv:
        who(events, gpu, sys.argv[sys.argv.index("--who") + 1], steps)


def who(events, gpu, pattern, steps):
    """Host call stacks (titan scopes and ATen ops) of the launches of matching kernels."""
    launches = {}
    for e in events:
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    ops = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            ops[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    for v in ops.values():
        v.sort()
    stacks = defaultdict(lambda: [0.0, 0])
    for k in gpu:
        if not re.search(pattern, k["name"], re.I):
            continue
        launch = launches.get(k.get("args", {}).get("correlation"))
        names = []
        if launch:
            t = launch["ts"]
            for a, b, name in ops.get(launch["tid"], []):
                if a > t:
                    break
                if b >= t:
                    names.append(name)
        key = " > ".join(n for n in names if n.startswith("titan/"))[-80:] + " | " + \
            " > ".join(n for n in names if not n.startswith("titan/"))[-120:]
        stacks[key][0] += k["dur"]; stacks[key][1] += 1
    print(f"launch sites of kernels matching /{pattern}/ (ms/step, calls/step):")
    for key, (d, n) in sorted(stacks.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {d/1e3/steps:8.2f} {n//steps:5d}  {key}")


if __name__ == "__main__":
    main()
