// Host memory bounds: cgroup memory limits found over the whole hierarchy above a process's
// group (v2 and v1, Slurm's job-level limit, a container's root), and "no limit" values.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "support/test_support.h"
#include "titan/util/device.h"

using namespace titan;

namespace {

void limit_file(const test::TempDir& root, const std::string& dir, const std::string& file,
                const std::string& value) {
  std::filesystem::create_directories(root.file(dir));
  test::write_file(root.file(dir + "/" + file), value + "\n");
}

}  // namespace

// Slurm (cgroup v2) puts --mem on job_N; the task's own group and the step's say "max".
TEST(HostMemory, CgroupV2LimitOfAnAncestorGroupCounts) {
  test::TempDir root;
  limit_file(root, ".", "memory.max", "max");
  limit_file(root, "system.slice/slurmstepd.scope", "memory.max", "max");
  limit_file(root, "system.slice/slurmstepd.scope/job_7", "memory.max", "8589934592");
  limit_file(root, "system.slice/slurmstepd.scope/job_7/step_0", "memory.max", "max");
  limit_file(root, "system.slice/slurmstepd.scope/job_7/step_0/user/task_0", "memory.max", "max");
  EXPECT_EQ(cgroup_memory_limit(root.path(),
                                "0::/system.slice/slurmstepd.scope/job_7/step_0/"
                                "user/task_0\n"),
            int64_t{8589934592});
  // A tighter limit lower down wins; no limit anywhere is 0.
  limit_file(root, "system.slice/slurmstepd.scope/job_7/step_0", "memory.max", "4294967296");
  EXPECT_EQ(cgroup_memory_limit(root.path(),
                                "0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0"),
            int64_t{4294967296});
  EXPECT_EQ(cgroup_memory_limit(root.path(), "0::/system.slice/slurmstepd.scope"), 0);
  // Inside a container the listed path is not visible: the mount's root is the group.
  limit_file(root, ".", "memory.max", "2147483648");
  EXPECT_EQ(cgroup_memory_limit(root.path(), "0::/../../kubepods/pod1/abc\n"), int64_t{2147483648});
}

// cgroup v1 (and hybrid systems): the memory controller's own hierarchy, its "unlimited"
// value (a page-rounded 2^63 - 1), other controllers ignored.
TEST(HostMemory, CgroupV1LimitsAndUnlimitedValues) {
  test::TempDir root;
  limit_file(root, "memory", "memory.limit_in_bytes", "9223372036854771712");
  limit_file(root, "memory/slurm/uid_0/job_9", "memory.limit_in_bytes", "6442450944");
  limit_file(root, "memory/slurm/uid_0/job_9/step_0/task_0", "memory.limit_in_bytes",
             "9223372036854771712");
  limit_file(root, "cpu/slurm", "memory.limit_in_bytes", "1024");  // not the memory hierarchy
  const std::string v1 =
      "12:cpu,cpuacct:/slurm\n"
      "4:memory:/slurm/uid_0/job_9/step_0/task_0\n"
      "0::/\n";
  EXPECT_EQ(cgroup_memory_limit(root.path(), v1), int64_t{6442450944});
  // Co-mounted controllers are parsed too; nothing but unlimited values is 0.
  EXPECT_EQ(cgroup_memory_limit(root.path(), "5:blkio,memory:/\n"), 0);
  EXPECT_EQ(cgroup_memory_limit(root.path(), ""), 0);
}

// The process's own bounds: positive, and the tighter one is reported.
TEST(HostMemory, ReportsTheTighterBound) {
  const HostMemory& m = host_memory();
  EXPECT_GT(m.shared_bytes, 0);
  EXPECT_TRUE(m.shared_bound == "physical memory" || m.shared_bound == "cgroup limit");
  EXPECT_LE(m.bytes(), m.shared_bytes);
  if (m.process_bytes > 0 && m.process_bytes < m.shared_bytes) {
    EXPECT_EQ(m.bound(), "ulimit -v");
  } else {
    EXPECT_EQ(m.bound(), m.shared_bound);
  }
}
