#!/usr/bin/env python3
"""torch.distributed's all_gather_into_tensor / reduce_scatter_tensor bus bandwidth over the
same sizes as titan_dist_worker's bench (1 MiB to 1 GiB, bf16), for the side-by-side check.
Run: torchrun --nproc_per_node=N scripts/bench_comm.py"""
import json, os, time
import torch
import torch.distributed as dist

def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    nbytes = 1 << 20
    while nbytes <= 1 << 30:
        n = nbytes // 2
        full = torch.empty(n, dtype=torch.bfloat16, device="cuda")
        shard = torch.ones(n // world, dtype=torch.bfloat16, device="cuda")
        def timed(fn):
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            iters = 20 if nbytes >= 1 << 28 else 50
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / iters
        ag = timed(lambda: dist.all_gather_into_tensor(full, shard))
        rs = timed(lambda: dist.reduce_scatter_tensor(shard, full))
        f = (world - 1) / world
        if rank == 0:
            print(json.dumps({"impl": "torch.distributed", "bytes": nbytes,
                              "all_gather_busbw_gbps": round(nbytes * f / ag / 1e9, 2),
                              "reduce_scatter_busbw_gbps": round(nbytes * f / rs / 1e9, 2)}), flush=True)
        nbytes *= 4
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
