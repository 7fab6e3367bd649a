// In-process communicator group (threads): a generation barrier plus per-rank slots for
// collectives and per-(sender, receiver) queues for point-to-point transfers.
#include "support/thread_group.h"

#include <ATen/ATen.h>

#include <condition_variable>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <thread>

namespace titan::test {
namespace {

struct Shared {
  explicit Shared(int n) : size(n), slots(static_cast<size_t>(n)) {}
  int size;
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  int64_t generation = 0;
  std::vector<at::Tensor> slots;                               // one per rank, per collective
  std::map<std::pair<int, int>, std::deque<at::Tensor>> mail;  // (from, to) -> in order

  void barrier() {
    std::unique_lock<std::mutex> lock(mu);
    const int64_t gen = generation;
    if (++arrived == size) {
      arrived = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != gen; });
    }
  }
};

class DoneWork final : public dist::Work {
 public:
  void wait() override {}
  bool completed() override { return true; }
};

class ThreadCommunicator final : public dist::Communicator {
 public:
  ThreadCommunicator(std::shared_ptr<Shared> shared, int rank, std::vector<int> ranks)
      : Communicator("threads", rank, shared->size, std::move(ranks), nullptr),
        shared_(std::move(shared)) {}
  std::string backend() const override { return "threads"; }
  void abort() override {}
  std::unique_ptr<Communicator> split(const std::string&, int, int, std::vector<int>) override {
    return nullptr;
  }

 protected:
  // Every rank posts its tensor, then each reads what it needs, then all leave together.
  template <typename F>
  dist::WorkPtr exchange(const at::Tensor& mine, F&& read) {
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      shared_->slots[static_cast<size_t>(rank())] = mine.clone();
    }
    shared_->barrier();
    read(shared_->slots);
    sync(mine);
    shared_->barrier();
    return std::make_shared<DoneWork>();
  }
  static at::Tensor sum(const std::vector<at::Tensor>& all, dist::ReduceOp op) {
    at::Tensor acc = all[0].clone();
    for (size_t i = 1; i < all.size(); ++i) acc.add_(all[i]);
    if (op == dist::ReduceOp::Avg) acc.div_(static_cast<double>(all.size()));
    return acc;
  }
  static void sync(const at::Tensor& t) {
    if (t.is_cuda()) t.cpu();  // waits for the device's queued copies
  }
  dist::WorkPtr do_all_reduce(const at::Tensor& t, dist::ReduceOp op) override {
    return exchange(t, [&](const std::vector<at::Tensor>& all) { t.copy_(sum(all, op)); });
  }
  dist::WorkPtr do_all_gather(const at::Tensor& out, const at::Tensor& in) override {
    return exchange(in, [&](const std::vector<at::Tensor>& all) {
      at::Tensor flat = out.view({-1});
      for (size_t r = 0; r < all.size(); ++r) {
        flat.narrow(0, static_cast<int64_t>(r) * in.numel(), in.numel()).copy_(all[r].view({-1}));
      }
    });
  }
  dist::WorkPtr do_reduce_scatter(const at::Tensor& out, const at::Tensor& in,
                                  dist::ReduceOp op) override {
    return exchange(in, [&](const std::vector<at::Tensor>& all) {
      out.view({-1}).copy_(sum(all, op).view({-1}).narrow(0, rank() * out.numel(), out.numel()));
    });
  }
  dist::WorkPtr do_broadcast(const at::Tensor& t, int root) override {
    return exchange(
        t, [&](const std::vector<at::Tensor>& all) { t.copy_(all[static_cast<size_t>(root)]); });
  }
  dist::WorkPtr do_all_to_all(const at::Tensor& out, const at::Tensor& in) override {
    return exchange(in, [&](const std::vector<at::Tensor>& all) {
      const int64_t block = in.numel() / size();
      for (int r = 0; r < size(); ++r) {
        out.view({-1})
            .narrow(0, r * block, block)
            .copy_(all[static_cast<size_t>(r)].view({-1}).narrow(0, rank() * block, block));
      }
    });
  }
  dist::WorkPtr do_barrier() override {
    shared_->barrier();
    return std::make_shared<DoneWork>();
  }
  // Sends are posted first (copies), then receives wait for their sender's message.
  dist::WorkPtr do_send_recv(const std::vector<dist::P2POp>& ops) override {
    for (const auto& op : ops) {
      if (op.kind != dist::P2POp::Kind::Send) continue;
      std::lock_guard<std::mutex> lock(shared_->mu);
      shared_->mail[{rank(), op.peer}].push_back(op.tensor.clone());
      shared_->cv.notify_all();
    }
    for (const auto& op : ops) {
      if (op.kind != dist::P2POp::Kind::Recv) continue;
      std::unique_lock<std::mutex> lock(shared_->mu);
      auto& box = shared_->mail[{op.peer, rank()}];
      shared_->cv.wait(lock, [&] { return !box.empty(); });
      at::Tensor msg = box.front();
      box.pop_front();
      lock.unlock();
      op.tensor.copy_(msg);
      sync(op.tensor);
    }
    return std::make_shared<DoneWork>();
  }

 private:
  std::shared_ptr<Shared> shared_;
};

}  // namespace

void run_thread_group(int size, const std::function<void(int rank, dist::Communicator& comm)>& fn) {
  auto shared = std::make_shared<Shared>(size);
  std::vector<int> ranks;
  for (int r = 0; r < size; ++r) ranks.push_back(r);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(size));
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        ThreadCommunicator comm(shared, r, ranks);
        fn(r, comm);
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace titan::test
