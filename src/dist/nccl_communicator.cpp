// NCCL backend. Each communicator owns a high-priority CUDA stream. An operation:
//   1. records an event on the caller's current stream (inputs are ready) and makes the
//      communicator's stream wait for it;
//   2. records a start event, runs the NCCL call, records an end event, all on its stream;
//   3. marks the tensors' memory as used by its stream (the caching allocator then keeps it
//      until the operation is done, even if the caller frees the tensor).
// Work::wait() makes the caller's current stream wait for the end event: later kernels are
// ordered after the collective, and the host never blocks. The watchdog polls the events.
// Events come from a per-communicator pool and return to it when the Work is dropped (creating
// and destroying two events per operation cost more host time than a 1 MiB collective).
#include "titan/dist/backends.h"
#include "titan/util/error.h"

#ifdef TITAN_WITH_CUDA
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <nccl.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstring>
#include <mutex>

namespace titan::dist {
namespace {

#define TITAN_NCCL_CHECK(expr)                                                                \
  do {                                                                                        \
    ncclResult_t _r = (expr);                                                                 \
    TITAN_CHECK(_r == ncclSuccess, "NCCL error in " #expr ": ", ncclGetErrorString(_r), " (", \
                ncclGetLastError(nullptr), ")");                                              \
  } while (0)

#define TITAN_CUDA_CHECK(expr)                                                           \
  do {                                                                                   \
    cudaError_t _e = (expr);                                                             \
    TITAN_CHECK(_e == cudaSuccess, "CUDA error in " #expr ": ", cudaGetErrorString(_e)); \
  } while (0)

ncclDataType_t nccl_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kBFloat16: return ncclBfloat16;
    case at::kHalf: return ncclFloat16;
    case at::kDouble: return ncclFloat64;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kByte: return ncclUint8;
    case at::kChar: return ncclInt8;
    case at::kBool: return ncclUint8;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 24, 0)
    case at::kFloat8_e4m3fn: return ncclFloat8e4m3;
    case at::kFloat8_e5m2: return ncclFloat8e5m2;
#endif
    default: internal_fail("NCCL cannot communicate dtype ", c10::toString(t));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return ncclSum;
    case ReduceOp::Avg: return ncclAvg;
    case ReduceOp::Max: return ncclMax;
  }
  return ncclSum;
}

// Timing-free CUDA events for reuse. Shared by a communicator and its outstanding Work (which
// may outlive it, e.g. inside the flight recorder), and released from any thread.
class EventPool {
 public:
  ~EventPool() {
    for (cudaEvent_t e : free_) cudaEventDestroy(e);
  }
  cudaEvent_t take() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        cudaEvent_t e = free_.back();
        free_.pop_back();
        return e;
      }
    }
    cudaEvent_t e = nullptr;
    TITAN_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return e;
  }
  // Re-recording a returned event is safe even if its last record has not completed yet:
  // nothing waits on an event after its Work is gone.
  void give(cudaEvent_t e) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(e);
  }

 private:
  std::mutex mu_;
  std::vector<cudaEvent_t> free_;
};

class NcclWork : public Work {
 public:
  NcclWork(std::shared_ptr<EventPool> pool, cudaEvent_t start, cudaEvent_t end,
           c10::DeviceIndex device)
      : pool_(std::move(pool)), start_(start), end_(end), device_(device) {}
  ~NcclWork() override {
    pool_->give(start_);
    pool_->give(end_);
  }
  void wait() override {
    c10::cuda::CUDAGuard guard(device_);
    TITAN_CUDA_CHECK(
        cudaStreamWaitEvent(at::cuda::getCurrentCUDAStream(device_).stream(), end_, 0));
  }
  void synchronize() override { TITAN_CUDA_CHECK(cudaEventSynchronize(end_)); }
  bool started() override { return cudaEventQuery(start_) == cudaSuccess; }
  bool completed() override { return cudaEventQuery(end_) == cudaSuccess; }

 private:
  std::shared_ptr<EventPool> pool_;
  cudaEvent_t start_, end_;
  c10::DeviceIndex device_;
};

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(std::string name, ncclComm_t comm, int rank, int size,
                   std::vector<int> global_ranks, c10::Device device, FlightRecorder* recorder)
      : Communicator(std::move(name), rank, size, std::move(global_ranks), recorder),
        comm_(comm),
        device_(device) {
    c10::cuda::CUDAGuard guard(device_);
    int lo = 0, hi = 0;
    TITAN_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    TITAN_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, hi));
    TITAN_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  }
  ~NcclCommunicator() override {
    if (!aborted_) ncclCommDestroy(comm_);
    cudaEventDestroy(ready_);
    cudaStreamDestroy(stream_);
  }

  std::string backend() const override { return "nccl"; }
  void abort() override {
    if (!aborted_) ncclCommAbort(comm_);
    aborted_ = true;
  }

  std::unique_ptr<Communicator> split(const std::string& name, int color, int key,
                                      std::vector<int> global_ranks) override {
    ncclComm_t sub = nullptr;
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    if (color < 0) {  // not a member of any new group: take part in the split only
      TITAN_NCCL_CHECK(ncclCommSplit(comm_, NCCL_SPLIT_NOCOLOR, key, &sub, &config));
      return nullptr;
    }
    TITAN_NCCL_CHECK(ncclCommSplit(comm_, color, key, &sub, &config));
    const int size = static_cast<int>(global_ranks.size());
    return std::make_unique<NcclCommunicator>(name, sub, key, size, std::move(global_ranks),
                                              device_, recorder());
  }

 protected:
  WorkPtr do_all_reduce(const at::Tensor& t, ReduceOp op) override {
    return launch({t}, [&] {
      return ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()),
                           nccl_type(t.scalar_type()), nccl_op(op), comm_, stream_);
    });
  }
  WorkPtr do_all_gather(const at::Tensor& out, const at::Tensor& in) override {
    return launch({out, in}, [&] {
      return ncclAllGather(in.data_ptr(), out.data_ptr(), static_cast<size_t>(in.numel()),
                           nccl_type(in.scalar_type()), comm_, stream_);
    });
  }
  WorkPtr do_reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op) override {
    return launch({out, in}, [&] {
      return ncclReduceScatter(in.data_ptr(), out.data_ptr(), static_cast<size_t>(out.numel()),
                               nccl_type(in.scalar_type()), nccl_op(op), comm_, stream_);
    });
  }
  WorkPtr do_broadcast(const at::Tensor& t, int root) override {
    return launch({t}, [&] {
      return ncclBroadcast(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()),
                           nccl_type(t.scalar_type()), root, comm_, stream_);
    });
  }
  WorkPtr do_send_recv(const std::vector<P2POp>& ops) override {
    std::vector<at::Tensor> tensors;
    for (const auto& o : ops) tensors.push_back(o.tensor);
    return launch(tensors, [&] {
      ncclResult_t r = ncclGroupStart();
      for (const auto& o : ops) {
        if (r != ncclSuccess) break;
        const size_t n = static_cast<size_t>(o.tensor.numel());
        const auto dt = nccl_type(o.tensor.scalar_type());
        r = o.kind == P2POp::Kind::Send
                ? ncclSend(o.tensor.data_ptr(), n, dt, o.peer, comm_, stream_)
                : ncclRecv(o.tensor.data_ptr(), n, dt, o.peer, comm_, stream_);
      }
      ncclResult_t e = ncclGroupEnd();
      return r != ncclSuccess ? r : e;
    });
  }
  WorkPtr do_all_to_all(const at::Tensor& out, const at::Tensor& in) override {
    return launch({out, in}, [&] {
      const size_t chunk = static_cast<size_t>(in.numel() / size());
      const size_t bytes = chunk * in.element_size();
      const auto dt = nccl_type(in.scalar_type());
      auto* src = static_cast<char*>(in.data_ptr());
      auto* dst = static_cast<char*>(out.data_ptr());
      ncclResult_t r = ncclGroupStart();
      for (int p = 0; p < size() && r == ncclSuccess; ++p) {
        r = ncclSend(src + p * bytes, chunk, dt, p, comm_, stream_);
        if (r == ncclSuccess) r = ncclRecv(dst + p * bytes, chunk, dt, p, comm_, stream_);
      }
      ncclResult_t e = ncclGroupEnd();
      return r != ncclSuccess ? r : e;
    });
  }
  WorkPtr do_barrier() override {
    at::Tensor t = at::zeros({1}, at::TensorOptions().device(device_));
    WorkPtr w = do_all_reduce(t, ReduceOp::Sum);
    return w;
  }

 private:
  template <typename F>
  WorkPtr launch(const std::vector<at::Tensor>& tensors, F&& call) {
    c10::cuda::CUDAGuard guard(device_);
    for (const auto& t : tensors) {
      TITAN_INTERNAL_CHECK(t.is_cuda() && t.device() == device_, "NCCL group ", name(),
                           " got a tensor on ", t.device(), ", expected ", device_);
    }
    cudaStream_t current = at::cuda::getCurrentCUDAStream(device_.index()).stream();
    TITAN_CUDA_CHECK(cudaEventRecord(ready_, current));
    TITAN_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
    cudaEvent_t start = events_->take(), end = events_->take();
    TITAN_CUDA_CHECK(cudaEventRecord(start, stream_));
    TITAN_NCCL_CHECK(call());
    TITAN_CUDA_CHECK(cudaEventRecord(end, stream_));
    const auto comm_stream = c10::cuda::getStreamFromExternal(stream_, device_.index());
    for (const auto& t : tensors) {
      if (t.numel() > 0) {
        c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), comm_stream);
      }
    }
    return std::make_shared<NcclWork>(events_, start, end, device_.index());
  }

  ncclComm_t comm_;
  c10::Device device_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  std::shared_ptr<EventPool> events_ = std::make_shared<EventPool>();
  bool aborted_ = false;
};

}  // namespace

bool nccl_available() {
  return true;
}

std::unique_ptr<Communicator> make_nccl_world(c10d::Store* store, int rank, int size,
                                              c10::Device device, FlightRecorder* recorder) {
  c10::cuda::CUDAGuard guard(device);
  ncclUniqueId id;
  const std::string key = "titan/nccl/unique_id";
  if (rank == 0) {
    TITAN_NCCL_CHECK(ncclGetUniqueId(&id));
    std::vector<uint8_t> bytes(sizeof(id));
    std::memcpy(bytes.data(), &id, sizeof(id));
    store->set(key, bytes);
  } else {
    auto bytes = store->get(key);
    TITAN_INTERNAL_CHECK(bytes.size() == sizeof(id), "malformed NCCL id in the store");
    std::memcpy(&id, bytes.data(), sizeof(id));
  }
  ncclComm_t comm = nullptr;
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  TITAN_NCCL_CHECK(ncclCommInitRankConfig(&comm, size, id, rank, &config));
  std::vector<int> ranks(static_cast<size_t>(size));
  for (int i = 0; i < size; ++i) ranks[static_cast<size_t>(i)] = i;
  return std::make_unique<NcclCommunicator>("world", comm, rank, size, std::move(ranks), device,
                                            recorder);
}

}  // namespace titan::dist

#else  // CPU build

namespace titan::dist {
bool nccl_available() {
  return false;
}
std::unique_ptr<Communicator> make_nccl_world(c10d::Store*, int, int, c10::Device,
                                              FlightRecorder*) {
  internal_fail("this titan build has no CUDA/NCCL support");
}
}  // namespace titan::dist
#endif
