"""PyTorch's async-TP fused ops on the shapes titan's tpbench times (titan_dist_worker tpbench):
all-gather + matmul and matmul + reduce-scatter, plain (NCCL collective then matmul) and fused
(torch.ops.symm_mem.fused_all_gather_matmul / fused_matmul_reduce_scatter). Multicast stays off
(TORCH_SYMM_MEM_DISABLE_MULTICAST=1). Run under torchrun, one process per GPU; prints JSON lines.
"""
import json
import os
import time

import torch
import torch.distributed as dist


def main():
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    group = dist.group.WORLD
    t = dist.get_world_size()
    tokens = int(os.environ.get("TP_BENCH_TOKENS", 8192))
    dim = int(os.environ.get("TP_BENCH_DIM", 4096))
    ffn = int(os.environ.get("TP_BENCH_FFN", 14336))
    iters = int(os.environ.get("TP_BENCH_ITERS", 20))
    dev, dt = torch.device("cuda", local), torch.bfloat16
    x = torch.randn(tokens // t, dim, device=dev, dtype=dt)
    w13 = torch.randn(dim, 2 * ffn // t, device=dev, dtype=dt) * 0.02
    g = torch.randn(tokens, ffn // t, device=dev, dtype=dt)
    w2 = torch.randn(ffn // t, dim, device=dev, dtype=dt) * 0.02

    def timed(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / iters

    def plain_ag():
        full = torch.empty(tokens, dim, device=dev, dtype=dt)
        dist.all_gather_into_tensor(full, x)
        return full @ w13

    def plain_rs():
        part = g @ w2
        out = torch.empty(tokens // t, dim, device=dev, dtype=dt)
        dist.reduce_scatter_tensor(out, part)
        return out

    results = {"impl": "torch", "tp": t, "tokens": tokens, "dim": dim, "ffn": ffn,
               "plain_all_gather_matmul_us": timed(plain_ag) * 1e6,
               "plain_matmul_reduce_scatter_us": timed(plain_rs) * 1e6}
    try:
        import torch.distributed._symmetric_memory as symm_mem
        name = group.group_name
        symm_mem.enable_symm_mem_for_group(name)
        results["fused_all_gather_matmul_us"] = timed(
            lambda: torch.ops.symm_mem.fused_all_gather_matmul(x, [w13], 0, name)) * 1e6
        results["fused_matmul_reduce_scatter_us"] = timed(
            lambda: torch.ops.symm_mem.fused_matmul_reduce_scatter(g, w2, "sum", 0, name)) * 1e6
    except Exception as e:  # an older PyTorch, or symmetric memory unavailable here
        results["fused_error"] = f"{type(e).__name__}: {e}"
    if rank == 0:
        print(json.dumps(results), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
