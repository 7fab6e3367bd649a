// Launch environment parsing (torchrun, Slurm, single process).
#include "titan/dist/launch.h"

#include <cstdlib>

#include "titan/util/error.h"
#include "titan/util/strings.h"

namespace titan::dist {
namespace {

int parse_env_int(const std::function<const char*(const char*)>& getenv, const char* name,
                  int min_value) {
  const char* v = getenv(name);
  TITAN_CHECK(v != nullptr, "environment variable ", name, " is not set");
  int64_t out = 0;
  TITAN_CHECK(util::parse_int(v, out) && out >= min_value && out < (int64_t(1) << 31),
              "environment variable ", name, "=\"", v, "\": expected an integer >= ", min_value);
  return static_cast<int>(out);
}

// "4(x2),2" -> tasks on the first node = 4.
int first_tasks_per_node(const std::string& s) {
  int64_t v = 0;
  std::string head = s.substr(0, s.find_first_of("(,"));
  return util::parse_int(head, v) && v > 0 ? static_cast<int>(v) : 1;
}

}  // namespace

std::string first_slurm_host(const std::string& nodelist) {
  std::string list = util::trim(nodelist);
  TITAN_CHECK(!list.empty(), "SLURM_JOB_NODELIST is empty");
  // The first entry ends at a comma outside brackets.
  size_t end = 0;
  int depth = 0;
  for (; end < list.size(); ++end) {
    if (list[end] == '[') ++depth;
    if (list[end] == ']') --depth;
    if (list[end] == ',' && depth == 0) break;
  }
  std::string first = list.substr(0, end);
  const size_t open = first.find('[');
  if (open == std::string::npos) return first;
  const size_t close = first.find(']', open);
  TITAN_CHECK(close != std::string::npos, "SLURM_JOB_NODELIST=\"", nodelist,
              "\": unbalanced brackets");
  std::string range = first.substr(open + 1, close - open - 1);
  range = range.substr(0, range.find(','));
  range = range.substr(0, range.find('-'));
  return first.substr(0, open) + range + first.substr(close + 1);
}

LaunchEnv read_launch_env(const std::function<const char*(const char*)>& getenv) {
  LaunchEnv env;
  if (getenv("RANK") || getenv("WORLD_SIZE")) {
    env.source = "torchrun-style";
    env.world_size = parse_env_int(getenv, "WORLD_SIZE", 1);
    env.rank = parse_env_int(getenv, "RANK", 0);
    env.local_rank = getenv("LOCAL_RANK") ? parse_env_int(getenv, "LOCAL_RANK", 0) : env.rank;
    env.local_world_size =
        getenv("LOCAL_WORLD_SIZE") ? parse_env_int(getenv, "LOCAL_WORLD_SIZE", 1) : env.world_size;
    if (env.world_size > 1) {
      TITAN_CHECK(getenv("MASTER_ADDR") != nullptr,
                  "environment variable MASTER_ADDR is not set (WORLD_SIZE=", env.world_size, ")");
      env.master_addr = getenv("MASTER_ADDR");
      env.master_port = parse_env_int(getenv, "MASTER_PORT", 1);
    }
  } else if (getenv("SLURM_PROCID") && getenv("SLURM_NTASKS")) {
    env.source = "slurm";
    env.rank = parse_env_int(getenv, "SLURM_PROCID", 0);
    env.world_size = parse_env_int(getenv, "SLURM_NTASKS", 1);
    env.local_rank = getenv("SLURM_LOCALID") ? parse_env_int(getenv, "SLURM_LOCALID", 0) : 0;
    if (const char* t = getenv("SLURM_NTASKS_PER_NODE")) {
      env.local_world_size = first_tasks_per_node(t);
    } else if (const char* t2 = getenv("SLURM_TASKS_PER_NODE")) {
      env.local_world_size = first_tasks_per_node(t2);
    }
    if (const char* addr = getenv("MASTER_ADDR")) {
      env.master_addr = addr;
    } else {
      TITAN_CHECK(getenv("SLURM_JOB_NODELIST") != nullptr,
                  "SLURM_JOB_NODELIST is not set and MASTER_ADDR is not either");
      env.master_addr = first_slurm_host(getenv("SLURM_JOB_NODELIST"));
    }
    if (getenv("MASTER_PORT")) {
      env.master_port = parse_env_int(getenv, "MASTER_PORT", 1);
    } else if (const char* job = getenv("SLURM_JOB_ID")) {
      // A port derived from the job id keeps concurrent jobs on one node apart.
      int64_t id = 0;
      util::parse_int(job, id);
      env.master_port = 20000 + static_cast<int>(id % 20000);
    }
  }
  TITAN_CHECK(env.rank < env.world_size, "rank ", env.rank, " is outside the world of ",
              env.world_size, " processes (", env.source, " environment)");
  TITAN_CHECK(env.local_rank < env.local_world_size || env.source == "slurm", "LOCAL_RANK ",
              env.local_rank, " must be below LOCAL_WORLD_SIZE ", env.local_world_size);
  TITAN_CHECK(env.master_port > 0 && env.master_port < 65536, "MASTER_PORT ", env.master_port,
              " is not a TCP port");
  return env;
}

LaunchEnv read_launch_env() {
  return read_launch_env([](const char* name) -> const char* { return std::getenv(name); });
}

}  // namespace titan::dist
