// One rank of a multi-process communication test (started by tests/unit/dist/* through
// test::run_ranks, or by torchrun on the GPU machine). Scenarios:
//   collectives  every collective on every group of the mesh, with exact expected values
//   hang         rank 1 skips a collective; the others' watchdog must fail with a clear error
//   idle         only the rendezvous (for missing-peer tests)
//   bench        all-gather / reduce-scatter bus bandwidth, 1 MiB to 1 GiB (GPU)
//   init         FSDP shards initialized per rank, gathered, equal the one-process weights
//   tpbench      tensor parallel over the world: all-gather + matmul and matmul + reduce-scatter,
//                plain and async (ring), on Llama 3 8B's shapes (TP_BENCH_TOKENS, _DIM, _FFN
//                override; scripts/bench_async_tp.py times PyTorch's fused ops on the same)
// Usage: titan_dist_worker SCENARIO [--section.key value ...]
#include <ATen/ATen.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "titan/config/job_config.h"
#include "titan/dist/launch.h"
#include "titan/dist/runtime.h"
#include "titan/model/init.h"
#include "titan/model/layout.h"
#include "titan/parallel/fsdp.h"
#include "titan/parallel/tensor_parallel.h"
#include "titan/util/device.h"
#include "titan/util/error.h"
#include "titan/util/log.h"

using namespace titan;
using dist::Communicator;
using dist::ReduceOp;

namespace {

at::TensorOptions g_opts;

void expect_equal(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  at::Tensor g = got.cpu().to(at::kDouble), w = want.cpu().to(at::kDouble);
  if (g.sizes() != w.sizes() || !at::allclose(g, w, 1e-5, 1e-5)) {
    std::ostringstream s;
    s << what << ": got " << g.flatten().slice(0, 0, 8) << " want " << w.flatten().slice(0, 0, 8);
    fail(s.str());
  }
}

void check_group(Communicator& c, const std::string& label) {
  const auto& m = c.global_ranks();
  const int g = c.size(), gr = c.rank();
  const int me = m[static_cast<size_t>(gr)];
  double sum = 0, mx = 0;
  for (int r : m) {
    sum += r + 1;
    mx = std::max<double>(mx, r + 1);
  }
  // all_reduce sum / avg / max, fp32, bf16 and int64
  for (auto dt : {at::kFloat, at::kBFloat16, at::kLong}) {
    at::Tensor t = at::full({5}, me + 1, g_opts.dtype(dt));
    c.all_reduce(t, ReduceOp::Sum);
    expect_equal(t, at::full({5}, sum), label + " all_reduce sum " + c10::toString(dt));
  }
  at::Tensor t = at::full({4}, me + 1, g_opts.dtype(at::kFloat));
  c.all_reduce(t, ReduceOp::Avg);
  expect_equal(t, at::full({4}, sum / g), label + " all_reduce avg");
  t = at::full({4}, me + 1, g_opts.dtype(at::kFloat));
  c.all_reduce(t, ReduceOp::Max);
  expect_equal(t, at::full({4}, mx), label + " all_reduce max");
  // all_gather, even and uneven (7) and zero-size chunks
  for (int64_t n : {3, 7, 0}) {
    at::Tensor in = at::arange(n, g_opts.dtype(at::kFloat)) + 100.0 * me;
    at::Tensor out = at::empty({g * n}, g_opts.dtype(at::kFloat));
    c.all_gather_into(out, in);
    std::vector<at::Tensor> parts;
    for (int r : m) parts.push_back(at::arange(n, at::kDouble) + 100.0 * r);
    expect_equal(out, at::cat(parts), label + " all_gather n=" + std::to_string(n));
  }
  // reduce_scatter sum / avg, uneven (5) and zero-size chunks
  for (int64_t n : {4, 5, 0}) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg}) {
      at::Tensor in = at::empty({g * n}, g_opts.dtype(at::kFloat));
      for (int j = 0; j < g; ++j) {
        in.narrow(0, j * n, n).copy_(at::arange(n, at::kFloat) + me * 1000.0 + j * 10.0);
      }
      at::Tensor out = at::empty({n}, g_opts.dtype(at::kFloat));
      c.reduce_scatter(out, in, op);
      double base = 0;
      for (int r : m) base += r * 1000.0;
      at::Tensor want = base + g * (gr * 10.0 + at::arange(n, at::kDouble));
      if (op == ReduceOp::Avg) want = want / g;
      expect_equal(out, want, label + " reduce_scatter " + dist::reduce_op_name(op));
    }
  }
  // broadcast from every root
  for (int root = 0; root < g; ++root) {
    at::Tensor b = at::full({6}, me, g_opts.dtype(at::kFloat));
    c.broadcast(b, root);
    expect_equal(b, at::full({6}, m[static_cast<size_t>(root)]), label + " broadcast");
  }
  // batched send/recv around the ring
  at::Tensor send = at::full({3}, me, g_opts.dtype(at::kFloat));
  at::Tensor recv = at::empty({3}, g_opts.dtype(at::kFloat));
  c.send_recv({{dist::P2POp::Kind::Send, send, (gr + 1) % g},
               {dist::P2POp::Kind::Recv, recv, (gr - 1 + g) % g}});
  expect_equal(recv, at::full({3}, m[static_cast<size_t>((gr - 1 + g) % g)]), label + " send_recv");
  // all_to_all with equal splits
  at::Tensor a_in = at::empty({g * 2}, g_opts.dtype(at::kFloat));
  for (int j = 0; j < g; ++j) {
    a_in.narrow(0, j * 2, 2).copy_(at::arange(2, at::kFloat) + me * 100.0 + j * 10.0);
  }
  at::Tensor a_out = at::empty({g * 2}, g_opts.dtype(at::kFloat));
  c.all_to_all(a_out, a_in);
  std::vector<at::Tensor> parts;
  for (int r : m) parts.push_back(at::arange(2, at::kDouble) + r * 100.0 + gr * 10.0);
  expect_equal(a_out, at::cat(parts), label + " all_to_all");
  // two asynchronous operations in flight at once
  at::Tensor x = at::full({1000}, me + 1, g_opts.dtype(at::kFloat));
  at::Tensor y = at::full({10}, 2 * (me + 1), g_opts.dtype(at::kFloat));
  auto wx = c.all_reduce(x, ReduceOp::Sum, true);
  auto wy = c.all_reduce(y, ReduceOp::Sum, true);
  wy->wait();
  wx->wait();
  expect_equal(x, at::full({1000}, sum), label + " async all_reduce");
  expect_equal(y, at::full({10}, 2 * sum), label + " async all_reduce 2");
  c.barrier();
}

void bench(dist::Runtime& rt) {
  Communicator* c = rt.world();
  const int g = c->size();
  for (int64_t bytes = int64_t(1) << 20; bytes <= (int64_t(1) << 30); bytes *= 4) {
    const int64_t n = bytes / 2;  // bf16 elements of the gathered (full) buffer
    at::Tensor full = at::empty({n}, g_opts.dtype(at::kBFloat16));
    at::Tensor shard = at::ones({n / g}, g_opts.dtype(at::kBFloat16));
    double enqueue_s = 0;  // host time to issue one operation (last timed op)
    auto time_op = [&](auto&& fn) {
      for (int i = 0; i < 5; ++i) fn();
      synchronize(g_opts.device());
      const int iters = bytes >= (int64_t(1) << 28) ? 20 : 50;
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) fn();
      enqueue_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
      synchronize(g_opts.device());
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
    };
    const double ag = time_op([&] { c->all_gather_into(full, shard); });
    const double ag_enqueue = enqueue_s;
    const double rs = time_op([&] { c->reduce_scatter(shard, full, ReduceOp::Sum); });
    // bus bandwidth as nccl-tests defines it: size * (g - 1) / g / time
    const double factor = static_cast<double>(g - 1) / g;
    if (rt.env().rank == 0) {
      std::printf(
          "{\"impl\": \"titan\", \"bytes\": %lld, \"all_gather_busbw_gbps\": %.2f, "
          "\"reduce_scatter_busbw_gbps\": %.2f, \"all_gather_us\": %.1f, "
          "\"all_gather_enqueue_us\": %.1f}\n",
          static_cast<long long>(bytes), bytes * factor / ag / 1e9, bytes * factor / rs / 1e9,
          ag * 1e6, ag_enqueue * 1e6);
      std::fflush(stdout);
    }
  }
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : fallback;
}

void tp_bench(dist::Runtime& rt) {
  Communicator* c = rt.world();
  TITAN_CHECK(c, "tpbench needs at least 2 ranks");
  const int64_t t = c->size();
  const int64_t tokens = env_int("TP_BENCH_TOKENS", 8192), dim = env_int("TP_BENCH_DIM", 4096);
  const int64_t ffn = env_int("TP_BENCH_FFN", 14336);
  const auto dt = g_opts.device().is_cuda() ? at::kBFloat16 : at::kFloat;
  const auto opts = g_opts.dtype(dt);
  // w1|w3 (column-parallel, 2 * ffn / t outputs) and w2 (row-parallel, ffn / t inputs).
  const at::Tensor x = at::randn({tokens / t, dim}, opts);
  const at::Tensor w13 = at::randn({dim, 2 * ffn / t}, opts) * 0.02;
  const at::Tensor g = at::randn({tokens, ffn / t}, opts);
  const at::Tensor w2 = at::randn({ffn / t, dim}, opts) * 0.02;
  const int iters = static_cast<int>(env_int("TP_BENCH_ITERS", 20));
  auto time_op = [&](auto&& fn) {
    for (int i = 0; i < 3; ++i) fn();
    synchronize(g_opts.device());
    c->barrier();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) fn();
    synchronize(g_opts.device());
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
  };
  for (bool async : {false, true}) {
    parallel::TensorParallel tp(c, {async, true});
    const double ag = time_op([&] { tp.gather_matmul(x, w13, nullptr); });
    const double rs = time_op([&] { tp.matmul_scatter(g, w2); });
    const double mm1 = time_op([&] { at::mm(at::empty({tokens, dim}, opts), w13); });
    const double mm2 = time_op([&] { at::mm(g, w2); });
    if (rt.env().rank == 0) {
      std::printf(
          "{\"impl\": \"titan\", \"async\": %s, \"tp\": %lld, \"tokens\": %lld, "
          "\"dim\": %lld, \"ffn\": %lld, \"all_gather_matmul_us\": %.1f, "
          "\"matmul_reduce_scatter_us\": %.1f, \"matmul_only_us\": [%.1f, %.1f]}\n",
          async ? "true" : "false", static_cast<long long>(t), static_cast<long long>(tokens),
          static_cast<long long>(dim), static_cast<long long>(ffn), ag * 1e6, rs * 1e6, mm1 * 1e6,
          mm2 * 1e6);
      std::fflush(stdout);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    TITAN_CHECK(argc >= 2, "usage: titan_dist_worker SCENARIO [--section.key value ...]");
    const std::string scenario = argv[1];
    // The mesh is tested for every dim, including those the trainer does not use yet, so the
    // trainer's feature checks (config::validate) are not applied here.
    config::JobConfig cfg;
    config::apply_cli(cfg, std::vector<std::string>(argv + 2, argv + argc));
    const auto env = dist::read_launch_env();
    log::init(env.rank, true, false);
    const char* dev = std::getenv("TITAN_DEVICE");
    c10::Device device(c10::kCPU);
    if (dev && std::string(dev) == "cuda") device = c10::Device(c10::kCUDA, env.local_rank);
    g_opts = at::TensorOptions().device(device);
    dist::Runtime rt(env, cfg, device);
    rt.enter_training();
    if (scenario == "collectives") {
      int groups = 0;
      if (rt.world()) {
        check_group(*rt.world(), "world");
        ++groups;
      }
      for (const char* name :
           {"pp", "dp_replicate", "dp_shard", "cp", "tp", "dp", "dp_shard_cp", "dp_cp"}) {
        if (Communicator* c = rt.mesh().group(name)) {
          check_group(*c, name);
          ++groups;
        }
      }
      synchronize(device);
      std::printf("rank %d: collectives OK on %d groups (%s)\n", env.rank, groups,
                  rt.mesh().describe().c_str());
    } else if (scenario == "hang") {
      at::Tensor t = at::ones({16}, g_opts);
      rt.world()->all_reduce(t, ReduceOp::Sum);
      if (env.rank == 1) {
        std::printf("rank 1: skipping the next all_reduce\n");
        std::fflush(stdout);
        std::this_thread::sleep_for(std::chrono::seconds(15));
        std::fflush(nullptr);
        std::_Exit(0);  // its peer died mid-collective: skip communicator teardown
      } else {
        rt.world()->all_reduce(t, ReduceOp::Sum);
        synchronize(device);
        std::printf("rank %d: the all_reduce finished without rank 1?\n", env.rank);
      }
      return 0;
    } else if (scenario == "idle") {
      std::printf("rank %d: rendezvous OK\n", env.rank);
    } else if (scenario == "bench") {
      bench(rt);
    } else if (scenario == "tpbench") {
      tp_bench(rt);
    } else if (scenario == "init") {
      // Every rank draws only its shard; gathered, the units equal a one-process init.
      auto args = model::llama_flavor("debugmodel");
      parallel::FsdpModel fsdp(model::llama_units(args), rt.world(), nullptr, device,
                               parallel::FsdpOptions{});
      fsdp.init_weights(cfg.debug.seed.value_or(0));
      for (size_t i = 0; i < fsdp.num_units(); ++i) {
        const auto& u = fsdp.unit(i);
        at::Tensor full = at::empty({u.shard_numel * rt.world()->size()}, u.master.options());
        rt.world()->all_gather_into(full, u.master);
        at::Tensor single = at::empty({u.layout.numel}, at::kFloat);
        model::init_unit_range(u.layout, cfg.debug.seed.value_or(0), 0, single);
        TITAN_CHECK(at::equal(full.narrow(0, 0, u.layout.numel).cpu(), single), "unit ",
                    u.layout.name, " differs from the one-process initialization");
        TITAN_CHECK(full.narrow(0, u.layout.numel, full.numel() - u.layout.numel)
                            .abs()
                            .sum()
                            .item<double>() == 0,
                    "padding of unit ", u.layout.name, " is not zero");
      }
      std::printf("rank %d: initialization OK (shards of %zu units)\n", env.rank, fsdp.num_units());
    } else {
      fail("unknown scenario ", scenario);
    }
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "titan_dist_worker: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "titan_dist_worker: internal error: %s\n", e.what());
    return 3;
  }
}
