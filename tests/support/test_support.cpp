// Test helpers: temp folders, subprocesses, tensor comparisons.
#include "support/test_support.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace titan::test {

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "titan_test_XXXXXX").string();
  char* p = mkdtemp(tmpl.data());
  if (!p) throw std::runtime_error("mkdtemp failed");
  path_ = p;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

ProcessResult run_process(const std::vector<std::string>& argv,
                          const std::vector<std::string>& env) {
  int pipefd[2];
  if (pipe(pipefd) != 0) throw std::runtime_error("pipe failed");
  pid_t pid = fork();
  if (pid == 0) {
    dup2(pipefd[1], 1);
    dup2(pipefd[1], 2);
    close(pipefd[0]);
    close(pipefd[1]);
    for (const auto& e : env) putenv(const_cast<char*>(strdup(e.c_str())));
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(pipefd[1]);
  ProcessResult r;
  std::array<char, 4096> buf;
  ssize_t n;
  while ((n = read(pipefd[0], buf.data(), buf.size())) > 0) r.output.append(buf.data(), n);
  close(pipefd[0]);
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

}  // namespace titan::test
