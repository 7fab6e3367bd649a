// `titan_train schedule`: prints a pipeline schedule as a timeline, with its bubble and the
// activations each rank holds, so users can see what a schedule does before running it.
#include <iostream>
#include <sstream>

#include <fmt/format.h>

#include "titan/parallel/pipeline/schedule.h"
#include "titan/util/error.h"
#include "titan/util/strings.h"

namespace titan::parallel::pipeline {

namespace {
const char* kUsage =
    "usage: titan_train schedule --pp P --microbatches M --schedule NAME [--stages S]\n"
    "                            [--csv FILE] [--forward 1] [--backward_input 1]\n"
    "                            [--backward_weight 1] [--actions]\n"
    "Prints each pipeline rank's actions as a timeline (cells: <stage><F|I|W|B><microbatch>,\n"
    "'.' idle) with the bubble, simulated with the given per-stage costs. NAME: GPipe, 1F1B,\n"
    "Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble. S defaults to P, or 2P\n"
    "for multi-stage schedules. --actions also lists every rank's actions with its sends and\n"
    "receives.\n";
}  // namespace

int run_schedule_command(const std::vector<std::string>& args) {
  int64_t pp = 0, microbatches = 0, stages = 0;
  std::string name, csv;
  ActionCosts costs;
  bool list_actions = false;
  for (size_t i = 0; i < args.size(); ++i) {
    auto value = [&]() -> std::string {
      TITAN_CHECK(i + 1 < args.size(), "schedule: ", args[i], " needs a value\n", kUsage);
      return args[++i];
    };
    auto number = [&](int64_t& out) {
      const std::string flag = args[i];
      const std::string v = value();
      TITAN_CHECK(util::parse_int(v, out) && out > 0, "schedule: ", flag,
                  " expects a positive integer, got \"", v, "\"");
    };
    auto cost = [&](double& out) {
      const std::string flag = args[i];
      const std::string v = value();
      TITAN_CHECK(util::parse_double(v, out) && out > 0, "schedule: ", flag,
                  " expects a positive number, got \"", v, "\"");
    };
    const std::string& a = args[i];
    if (a == "--pp") {
      number(pp);
    } else if (a == "--microbatches") {
      number(microbatches);
    } else if (a == "--stages") {
      number(stages);
    } else if (a == "--schedule") {
      name = value();
    } else if (a == "--csv") {
      csv = value();
    } else if (a == "--forward") {
      cost(costs.forward);
    } else if (a == "--backward_input") {
      cost(costs.backward_input);
    } else if (a == "--backward_weight") {
      cost(costs.backward_weight);
    } else if (a == "--actions") {
      list_actions = true;
    } else if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      return 0;
    } else {
      fail("schedule: unknown argument ", a, "\n", kUsage);
    }
  }
  TITAN_CHECK(pp > 0 && (microbatches > 0 || !csv.empty()) && (!name.empty() || !csv.empty()),
              "schedule: --pp, --microbatches and --schedule are required\n", kUsage);
  Schedule s;
  if (!csv.empty()) {
    const bool v = !name.empty() && v_placement(parse_schedule(name, "schedule: --schedule"));
    s = schedule_from_csv(csv, static_cast<int>(pp), v);
  } else {
    const ScheduleKind kind = parse_schedule(name, "schedule: --schedule");
    if (stages == 0) stages = pp * (multi_stage(kind) ? 2 : 1);
    s = build_schedule(kind, static_cast<int>(pp), static_cast<int>(stages),
                       static_cast<int>(microbatches));
  }
  check_schedule(s);
  const Simulation sim = simulate(s, costs);
  std::cout << fmt::format("{}: {} ranks, {} stages, {} microbatches; costs F {} I {} W {}\n",
                           s.name, s.pp, s.stages, s.microbatches, costs.forward,
                           costs.backward_input, costs.backward_weight);
  std::cout << render_timeline(s, sim);
  std::cout << fmt::format(
      "bubble {:.2f}% (idle between a rank's first and last action, worst rank); idle {:.2f}% of "
      "the step with fill and drain; makespan {}\n",
      100 * sim.bubble, 100 * sim.step_idle, sim.makespan);
  std::ostringstream peaks;
  for (size_t r = 0; r < sim.peak_in_flight.size(); ++r) {
    peaks << (r ? ", " : "") << sim.peak_in_flight[r];
  }
  std::cout << "microbatch-stages with saved activations at most, per rank: " << peaks.str()
            << "\n";
  if (list_actions) {
    for (int r = 0; r < s.pp; ++r) {
      std::cout << "rank " << r << ":";
      for (const auto& a : s.actions[static_cast<size_t>(r)]) {
        std::cout << ' ' << a.str() << (a.peer >= 0 ? "@" + std::to_string(a.peer) : "");
      }
      std::cout << "\n";
    }
  }
  return 0;
}

}  // namespace titan::parallel::pipeline
