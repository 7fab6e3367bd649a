// Where this process sits in the job: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), else Slurm's (SLURM_PROCID, SLURM_NTASKS,
// SLURM_LOCALID, first host of SLURM_JOB_NODELIST), else a single process.
#pragma once

#include <functional>
#include <string>

namespace titan::dist {

struct LaunchEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string source = "single process";  // "torchrun", "slurm" or "single process"
};

// Reads the launch environment through `getenv` (tests pass their own). Throws titan::Error
// naming the variable for malformed or inconsistent values.
LaunchEnv read_launch_env(const std::function<const char*(const char*)>& getenv);
LaunchEnv read_launch_env();

// First host of a Slurm node list: "node[01-04,07],gpu5" -> "node01".
std::string first_slurm_host(const std::string& nodelist);

}  // namespace titan::dist
