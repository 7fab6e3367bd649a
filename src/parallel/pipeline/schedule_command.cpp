// `titan_train schedule`: prints a pipeline schedule as a timeline, with its bubble and the
// activations each rank holds, so users can see what a schedule does before running it.
#include <iostream>
#include <string>
#include <utility>
#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "titan/model/layout.h"
#include "titan/model/llama_args.h"
#include "titan/parallel/pipeline/schedule.h"
#include "titan/parallel/pipeline/terapipe.h"
#include "titan/util/device.h"
#include "titan/util/error.h"
#include "titan/util/strings.h"

namespace titan::parallel::pipeline {

namespace {
const char* kUsage =
    "usage: titan_train schedule --pp P --microbatches M --schedule NAME [--stages S]\n"
    "                            [--csv FILE] [--forward 1] [--backward_input 1]\n"
    "                            [--backward_weight 1] [--actions]\n"
    "                            [--seq-len N [--token-slices auto|L1,L2,...] [--flavor 8B]\n"
    "                             [--microbatch-size 1] [--tflops 400] [--slice-overhead-us 50]\n"
    "                             [--measure]]\n"
    "Prints each pipeline rank's actions as a timeline (cells: <stage><F|I|W|B><microbatch>,\n"
    "'.' idle) with the bubble, simulated with the given per-stage costs. NAME: GPipe, 1F1B,\n"
    "Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, TeraPipe. S defaults to\n"
    "P, or 2P for multi-stage schedules. --actions also lists every rank's actions with its\n"
    "sends and receives.\n"
    "With --seq-len, each microbatch (or TeraPipe token slice) costs what one block of the\n"
    "flavor takes at the given TFLOP/s (forward 1/3, input and weight gradients 1/3 each), with\n"
    "attention growing with the tokens before it; TeraPipe's slices are the dynamic program's\n"
    "(auto, the default) or the given lengths. --measure times one block of the flavor on this\n"
    "machine's GPU (bf16; CPU fp32 without one) instead, as training's \"auto\" does.\n";

// The schedule library's messages name the job config's keys; this command's flags set them.
std::string with_flag_names(std::string message) {
  static const std::pair<const char*, const char*> kFlags[] = {
      {"training.local_batch_size or pipeline_parallel_microbatch_size", "--microbatches"},
      {"parallelism.pipeline_parallel_degree", "--pp"},
      {"parallelism.pipeline_parallel_token_slices", "--token-slices"},
      {"parallelism.pipeline_parallel_schedule_csv", "--csv"},
      {"training.seq_len", "--seq-len"},
  };
  for (const auto& [key, flag] : kFlags) {
    for (size_t at = message.find(key); at != std::string::npos;
         at = message.find(key, at + std::char_traits<char>::length(flag))) {
      message.replace(at, std::char_traits<char>::length(key), flag);
    }
  }
  return message;
}

int schedule_command(const std::vector<std::string>& args) {
  int64_t pp = 0, microbatches = 0, stages = 0;
  std::string name, csv;
  ActionCosts costs;
  bool list_actions = false;
  int64_t seq_len = 0, microbatch_size = 1;
  std::string slices_arg = "auto", flavor = "8B";
  double tflops = 400, overhead_us = 50;
  bool measure = false;
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
    } else if (a == "--seq-len") {
      number(seq_len);
    } else if (a == "--token-slices") {
      slices_arg = value();
    } else if (a == "--flavor") {
      flavor = value();
    } else if (a == "--microbatch-size") {
      number(microbatch_size);
    } else if (a == "--tflops") {
      cost(tflops);
    } else if (a == "--slice-overhead-us") {
      cost(overhead_us);
    } else if (a == "--measure") {
      measure = true;
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
  std::string model_note;
  if (!csv.empty()) {
    const bool v = !name.empty() && v_placement(parse_schedule(name, "schedule: --schedule"));
    s = schedule_from_csv(csv, static_cast<int>(pp), v);
  } else {
    const ScheduleKind kind = parse_schedule(name, "schedule: --schedule");
    if (stages == 0) stages = pp * (multi_stage(kind) ? 2 : 1);
    std::vector<int64_t> slices;
    if (seq_len > 0) {
      // Costs in milliseconds per block from the flavor's FLOPs.
      const model::LlamaArgs args = model::llama_flavor(flavor);
      SliceCostModel model =
          SliceCostModel::from_flops(args, microbatch_size, tflops * 1e12, overhead_us * 1e-6);
      if (measure) {
        const bool cuda = cuda_device_count() > 0;
        const c10::Device device = cuda ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
        const int64_t quantum = token_slice_quantum(seq_len, 1);
        const auto samples = measure_slice_times(
            args, model::BlockPlan::whole(args), model::llama_units(args).at(1), microbatch_size,
            seq_len, quantum, model::SavePolicy::All, cuda ? at::kBFloat16 : at::kFloat, device);
        std::vector<int64_t> lens, prefixes;
        std::vector<double> secs;
        for (const auto& x : samples) {
          lens.push_back(x.len);
          prefixes.push_back(x.prefix);
          secs.push_back(x.seconds);
          std::cout << fmt::format("measured: {} tokens after {}: {:.3f} ms\n", x.len, x.prefix,
                                   1e3 * x.seconds);
        }
        model = SliceCostModel::fit(lens, prefixes, secs);
        std::cout << fmt::format("slice time per block on {}: {}\n", describe_device(device).name,
                                 model.describe());
      }
      auto ms = [&](int64_t len, int64_t prefix) { return 1e3 * model.time_s(len, prefix); };
      if (kind == ScheduleKind::TeraPipe) {
        slices = parse_token_slices(util::split(slices_arg, ','), seq_len, 1);
        if (slices.empty()) {
          slices =
              optimal_token_slices(seq_len, token_slice_quantum(seq_len, 1),
                                   static_cast<int>(stages), static_cast<int>(microbatches), ms)
                  .lengths;
        }
      } else {
        slices = {seq_len};
      }
      int64_t prefix = 0;
      std::vector<double> per_slice;
      for (int64_t len : slices) {
        per_slice.push_back(ms(len, prefix));
        prefix += len;
      }
      for (int64_t mb = 0; mb < microbatches; ++mb) {
        for (double t : per_slice) costs.microbatch_scale.push_back(t);
      }
      costs.forward = costs.backward_input = costs.backward_weight = 1.0 / 3;
      model_note = fmt::format(
          "costs from llama3 {} {}, {} sequence(s) of {} tokens per microbatch, one block per "
          "stage (ms); token slices [{}]\n",
          flavor, measure ? "measured" : fmt::format("at {} TFLOP/s", tflops), microbatch_size,
          seq_len, fmt::join(slices, ", "));
      if (kind != ScheduleKind::TeraPipe) slices.clear();
    }
    s = build_schedule(kind, static_cast<int>(pp), static_cast<int>(stages),
                       static_cast<int>(microbatches), slices);
  }
  check_schedule(s);
  const Simulation sim = simulate(s, costs);
  std::cout << fmt::format(
      "{}: {} ranks, {} stages, {} microbatches; costs F {:.4g} I {:.4g} W "
      "{:.4g}\n",
      s.name, s.pp, s.stages, s.microbatches / s.slices, costs.forward, costs.backward_input,
      costs.backward_weight);
  std::cout << model_note;
  const std::string timeline = render_timeline(s, sim);
  if (timeline.size() <= 40000) {
    std::cout << timeline;
  } else {
    std::cout << "(timeline of " << timeline.size() << " characters omitted)\n";
  }
  std::cout << fmt::format(
      "bubble {:.2f}% (idle between a rank's first and last action, worst rank); idle {:.2f}% of "
      "the step with fill and drain; makespan {:.6g}\n",
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

}  // namespace

int run_schedule_command(const std::vector<std::string>& args) {
  try {
    return schedule_command(args);
  } catch (const Error& e) {
    throw Error(with_flag_names(e.what()));
  }
}

}  // namespace titan::parallel::pipeline
