// Test helpers: temp folders, subprocesses, tensor comparisons.
#include "support/test_support.h"

#include "titan/checkpoint/box.h"
#include "titan/checkpoint/safetensors.h"
#include "titan/config/job_config.h"
#include "titan/parallel/parallelize.h"
#include "titan/parallel/pipeline/stage.h"
#include "titan/parallel/pipeline/terapipe.h"
#include "titan/util/error.h"
#include "titan/util/fs.h"
#include "titan/util/strings.h"

#include <ATen/ATen.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace titan::test {

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "titan_test_XXXXXX").string();
  char* p = mkdtemp(tmpl.data());
  if (!p) throw std::runtime_error("mkdtemp failed");
  path_ = p;
}

TempDir::~TempDir() {
  std::error_code ec;
  util::remove_tree(util::path_str(path_));
}

AttentionResult causal_attention_reference(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& dout) {
  const int64_t s = q.size(1), rep = q.size(2) / k.size(2), hd = q.size(3);
  at::Tensor qf = q.to(at::kFloat).transpose(1, 2).detach().set_requires_grad(true);
  at::Tensor kf = k.to(at::kFloat).transpose(1, 2).detach().set_requires_grad(true);
  at::Tensor vf = v.to(at::kFloat).transpose(1, 2).detach().set_requires_grad(true);
  at::Tensor scores = at::matmul(qf, kf.repeat_interleave(rep, 1).transpose(-1, -2)) /
                      std::sqrt(static_cast<double>(hd));
  scores = scores.masked_fill(at::ones({s, s}, q.options().dtype(at::kBool)).triu(1), -INFINITY);
  at::Tensor out =
      at::matmul(at::softmax(scores, -1), vf.repeat_interleave(rep, 1)).transpose(1, 2);
  out.backward(dout.to(at::kFloat));
  return {out.detach(), qf.grad().transpose(1, 2), kf.grad().transpose(1, 2),
          vf.grad().transpose(1, 2)};
}

AttentionResult sliced_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& dout, const std::vector<int64_t>& lengths) {
  const int64_t s = q.size(1);
  parallel::pipeline::SliceKv cache;
  parallel::pipeline::TokenSliceAttention attention;
  std::vector<ops::AttentionSaved> saved(lengths.size());
  std::vector<int64_t> start;
  AttentionResult r{at::empty_like(q), at::empty_like(q), at::empty_like(k), at::empty_like(v)};
  int64_t at = 0;
  for (size_t j = 0; j < lengths.size(); ++j) {
    start.push_back(at);
    attention.use(&cache, at, s);
    r.out.narrow(1, at, lengths[j])
        .copy_(attention.forward(q.narrow(1, at, lengths[j]), k.narrow(1, at, lengths[j]),
                                 v.narrow(1, at, lengths[j]), saved[j]));
    at += lengths[j];
  }
  for (size_t j = lengths.size(); j-- > 0;) {
    attention.use(&cache, start[j], s);
    auto [gq, gk, gv] =
        attention.backward(dout.narrow(1, start[j], lengths[j]), saved[j], k.size(2));
    r.dq.narrow(1, start[j], lengths[j]).copy_(gq);
    r.dk.narrow(1, start[j], lengths[j]).copy_(gk);
    r.dv.narrow(1, start[j], lengths[j]).copy_(gv);
  }
  return r;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

namespace {

// Starts argv[0] with `env` added and stdout+stderr into a pipe; returns the pipe's read end.
pid_t spawn(const std::vector<std::string>& argv, const std::vector<std::string>& env,
            int* read_fd) {
  int pipefd[2];
  if (pipe(pipefd) != 0) throw std::runtime_error("pipe failed");
  pid_t pid = fork();
  if (pid == 0) {
    dup2(pipefd[1], 1);
    dup2(pipefd[1], 2);
    close(pipefd[0]);
    close(pipefd[1]);
    for (const auto& e : env) putenv(strdup(e.c_str()));
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(pipefd[1]);
  *read_fd = pipefd[0];
  return pid;
}

}  // namespace

ProcessResult run_process(const std::vector<std::string>& argv,
                          const std::vector<std::string>& env) {
  int fd = -1;
  const pid_t pid = spawn(argv, env, &fd);
  ProcessResult r;
  std::array<char, 4096> buf;
  ssize_t n;
  while ((n = read(fd, buf.data(), buf.size())) > 0) r.output.append(buf.data(), n);
  close(fd);
  int status = 0;
  waitpid(pid, &status, 0);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

ProcessResult run_titan_train(const std::vector<std::string>& args,
                              const std::vector<std::string>& env) {
  std::vector<std::string> argv = {TITAN_TRAIN_BINARY};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<std::string> e = env;
  e.push_back("TITAN_DEVICE=cpu");
  return run_process(argv, e);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

double relative_error(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor x = a.to(at::kDouble).cpu();
  at::Tensor y = b.to(at::kDouble).cpu();
  double denom = y.norm().item<double>();
  double num = (x - y).norm().item<double>();
  return denom == 0 ? num : num / denom;
}

std::vector<double> read_losses(const std::string& jsonl_path) {
  std::vector<double> out;
  std::ifstream in(jsonl_path);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) out.push_back(j["loss"].get<double>());
  }
  return out;
}

std::string python() {
  if (const char* p = std::getenv("TITAN_TEST_PYTHON"); p && *p) return p;
  if (const char* path = std::getenv("PATH")) {
    for (const auto& dir : util::split(path, ':')) {
      const std::string candidate = dir + "/python3";
      if (!dir.empty() && access(candidate.c_str(), X_OK) == 0) return candidate;
    }
  }
  return "/usr/bin/python3";
}

bool python_can_import(const std::string& modules) {
  const std::string py = python();
  return access(py.c_str(), X_OK) == 0 &&
         run_process({py, "-c", "import " + modules}).exit_code == 0;
}

at::Tensor single_stage_step(const model::LlamaArgs& args, parallel::FsdpModel& fsdp,
                             const at::Tensor& tokens, double grad_scale,
                             const std::string& ac_mode, const std::string& ac_option) {
  config::ActivationCheckpointSection ac;
  ac.mode = ac_mode;
  ac.selective_ac_option = ac_option;
  if (ac_mode == "memory_budget") ac.memory_budget = std::stod(ac_option);
  const auto policy = parallel::CheckpointPolicy::from_config(ac, args, tokens.size(1) - 1);
  std::vector<model::SavePolicy> policies;
  for (int64_t l = 0; l < args.n_layers; ++l) policies.push_back(policy.for_layer(l));
  std::vector<size_t> units;
  for (size_t i = 0; i < fsdp.num_units(); ++i) units.push_back(i);
  parallel::pipeline::RopeCache ropes(args);
  parallel::pipeline::StageOptions opts;
  opts.compute_dtype = fsdp.options().param_dtype;
  parallel::pipeline::Stage stage({0, true, 0, static_cast<int>(args.n_layers), true}, units, args,
                                  fsdp, ropes, policies, opts);
  stage.begin_step(1);
  const int64_t seq = tokens.size(1) - 1;
  at::Tensor loss_sum =
      at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(tokens.device()));
  stage.forward(0, tokens.narrow(1, 0, seq), tokens.narrow(1, 1, seq).reshape({-1}), grad_scale,
                loss_sum);
  stage.backward(0, at::Tensor(), /*with_weight=*/true);
  fsdp.finish_grad_reduction();
  return loss_sum;
}

at::Tensor read_checkpoint_tensor(const std::string& dir, const std::string& name) {
  std::ifstream in(dir + "/metadata.json");
  const nlohmann::json meta = nlohmann::json::parse(in);
  const auto& t = meta.at("tensors").at(name);
  const auto shape = t.at("shape").get<std::vector<int64_t>>();
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  at::Tensor out = at::empty({numel}, checkpoint::scalar_type_of(t.at("dtype").get<std::string>()));
  int64_t covered = 0;
  // Each chunk is a flat range of a box of the tensor (the whole tensor without "box").
  const checkpoint::Box whole = checkpoint::Box::whole(shape);
  for (const auto& c : t.at("chunks")) {
    checkpoint::SafetensorsReader r(dir + "/" + c.at("file").get<std::string>());
    const int64_t offset = c.at("offset"), n = c.at("numel");
    const checkpoint::Box box =
        c.contains("box") ? checkpoint::Box{c["box"]["offset"].get<std::vector<int64_t>>(),
                                            c["box"]["shape"].get<std::vector<int64_t>>()}
                          : whole;
    const at::Tensor data = r.read(c.at("key").get<std::string>()).reshape({-1});
    for (const auto& rect : checkpoint::flat_range_rects(box, offset, n)) {
      checkpoint::rect_view(out, whole, 0, rect)
          .copy_(checkpoint::rect_view(data, box, offset, rect));
    }
    covered += n;
  }
  if (covered != numel) throw std::runtime_error("checkpoint " + dir + " misses part of " + name);
  return out.view(shape);
}

at::TensorOptions cuda_options(at::ScalarType t) {
  return at::TensorOptions().dtype(t).device(at::kCUDA);
}

double kernel_tolerance(at::ScalarType t) {
  return t == at::kBFloat16 ? 1e-2 : 1e-5;
}

std::map<std::string, at::Tensor> read_checkpoint_weights(const std::string& dir) {
  std::ifstream in(dir + "/metadata.json");
  const nlohmann::json meta = nlohmann::json::parse(in);
  std::map<std::string, at::Tensor> out;
  for (auto it = meta.at("tensors").begin(); it != meta.at("tensors").end(); ++it) {
    if (it.key().find('/') == std::string::npos)
      out[it.key()] = read_checkpoint_tensor(dir, it.key());
  }
  return out;
}

bool gloo_available() {
#ifdef TITAN_WITH_GLOO
  return true;
#else
  return false;
#endif
}

int free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int port = ntohs(addr.sin_port);
  close(fd);
  return port;
}

std::vector<ProcessResult> run_ranks(const std::vector<std::string>& argv, int world,
                                     const std::vector<std::string>& env, double timeout_s,
                                     const std::vector<int>& ranks_to_start,
                                     const std::vector<std::vector<std::string>>& rank_env) {
  const int port = free_port();
  std::vector<int> ranks = ranks_to_start;
  if (ranks.empty()) {
    for (int r = 0; r < world; ++r) ranks.push_back(r);
  }
  struct Child {
    pid_t pid;
    int fd;
    bool done = false;
  };
  std::vector<Child> children;
  std::vector<ProcessResult> results(ranks.size());
  for (int r : ranks) {
    std::vector<std::string> vars = {"RANK=" + std::to_string(r),
                                     "WORLD_SIZE=" + std::to_string(world),
                                     "LOCAL_RANK=" + std::to_string(r),
                                     "LOCAL_WORLD_SIZE=" + std::to_string(world),
                                     "MASTER_ADDR=127.0.0.1",
                                     "MASTER_PORT=" + std::to_string(port),
                                     "TITAN_DEVICE=cpu",
                                     "OMP_NUM_THREADS=1"};
    vars.insert(vars.end(), env.begin(), env.end());
    std::vector<std::string> rank_argv = argv;
    if (static_cast<size_t>(r) < rank_env.size()) {
      for (const auto& e : rank_env[static_cast<size_t>(r)]) {
        // NAME=VALUE entries are environment; options and their values are arguments.
        const bool is_env = e.rfind("--", 0) != 0 && e.find('=') != std::string::npos;
        (is_env ? vars : rank_argv).push_back(e);
      }
    }
    int fd = -1;
    const pid_t pid = spawn(rank_argv, vars, &fd);
    children.push_back({pid, fd});
  }
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  size_t remaining = children.size();
  std::array<char, 4096> buf;
  while (remaining > 0) {
    std::vector<pollfd> fds;
    for (auto& c : children) {
      if (!c.done) fds.push_back({c.fd, POLLIN, 0});
    }
    poll(fds.data(), fds.size(), 100);
    for (size_t i = 0; i < children.size(); ++i) {
      auto& c = children[i];
      if (c.done) continue;
      ssize_t n;
      while (true) {
        pollfd p{c.fd, POLLIN, 0};
        if (poll(&p, 1, 0) <= 0) break;
        n = read(c.fd, buf.data(), buf.size());
        if (n <= 0) {
          int status = 0;
          waitpid(c.pid, &status, 0);
          results[i].exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
          close(c.fd);
          c.done = true;
          --remaining;
          break;
        }
        results[i].output.append(buf.data(), static_cast<size_t>(n));
      }
    }
    if (std::chrono::steady_clock::now() > deadline) {
      for (size_t i = 0; i < children.size(); ++i) {
        auto& c = children[i];
        if (c.done) continue;
        kill(c.pid, SIGKILL);
        int status = 0;
        waitpid(c.pid, &status, 0);
        results[i].exit_code = -9;  // killed at the deadline
        results[i].output += "\n[killed after the test's deadline]";
        close(c.fd);
        c.done = true;
      }
      break;
    }
  }
  return results;
}

}  // namespace titan::test
