// Pipeline schedules as data: for every pipeline rank, the ordered list of actions it performs
// in one optimizer step (forward, backward of the input, backward of the weights, and the sends
// and receives of activations and gradients, each with stage and microbatch). Generators build
// GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble and ZBVZeroBubble, or read a
// schedule from a CSV file; a checker proves a schedule well-formed; a simulator with given
// per-action costs reports each rank's timeline and the bubble. One runtime executes them all
// (parallel/pipeline/executor.h). Nothing here touches tensors.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace titan::parallel::pipeline {

enum class ScheduleKind {
  GPipe,
  OneFOneB,
  Interleaved1F1B,
  LoopedBFS,
  InterleavedZeroBubble,
  ZBVZeroBubble,
  // Token-level pipeline (TeraPipe): each microbatch's sequence runs as token slices, forward
  // in order through the stages (GPipe-style), backward in reverse.
  TeraPipe,
};

// "1F1B", ... as torchtitan (and PyTorch) name them.
const char* schedule_name(ScheduleKind kind);
// Case-insensitive; a wrong name is a titan::Error listing the valid ones (`key` names the
// config key in the message).
ScheduleKind parse_schedule(const std::string& name, const std::string& key);
// Whether a rank holds several stages (looped or V placement).
bool multi_stage(ScheduleKind kind);
// V placement: rank r holds stages r and 2p - 1 - r (otherwise looped: r, r + p, ...).
bool v_placement(ScheduleKind kind);
// Whether the weight-gradient pass is a separate action (zero-bubble schedules).
bool splits_weight(ScheduleKind kind);

enum class ActionType : uint8_t {
  Forward,         // F: stage forward of one microbatch (the last stage also computes its loss)
  Backward,        // B: input and weight gradients of one microbatch
  BackwardInput,   // I: input gradient only (the weight gradient follows as W)
  BackwardWeight,  // W: weight gradient of a microbatch whose I ran
  SendActivation,  // to the rank of stage + 1
  RecvActivation,  // from the rank of stage - 1, for stage
  SendGradient,    // to the rank of stage - 1
  RecvGradient,    // from the rank of stage + 1, for stage
};
const char* action_code(ActionType t);  // "F", "B", "I", "W", "SEND_F", "RECV_F", ...
bool is_compute(ActionType t);

struct Action {
  ActionType type = ActionType::Forward;
  int stage = 0;
  int microbatch = 0;
  int peer = -1;            // pipeline rank at the other end of a send or receive
  std::string str() const;  // "2F5", "1SEND_F3" (PyTorch's action notation)
};

struct Schedule {
  std::string name;
  int pp = 1;            // pipeline ranks
  int stages = 1;        // stages (pp x stages per rank)
  int microbatches = 1;  // per optimizer step (per gradient-accumulation pass)
  // Token slices (TeraPipe): schedule microbatch u is slice u % slices of the sequence batch
  // u / slices, covering tokens [sum of slice_lengths before it, + its length). `microbatches`
  // counts slices; without slicing, slices = 1 and slice_lengths is empty.
  int slices = 1;
  std::vector<int64_t> slice_lengths;
  std::vector<int> stage_rank;               // pipeline rank holding each stage
  std::vector<std::vector<Action>> actions;  // per rank, in execution order
  std::vector<int> stages_of(int rank) const;
};

// Stage -> rank: looped (stage s on rank s % p) or V (rank r: stages r and 2p - 1 - r).
std::vector<int> stage_ranks(int pp, int stages, bool v);

// Builds `kind` for `pp` ranks, `stages` stages and `microbatches` microbatches, with the sends
// and receives between ranks inserted. Throws titan::Error when the combination is impossible
// (stages not a multiple of pp, a V schedule without two stages per rank, microbatches not
// divisible as an interleaved schedule needs). TeraPipe takes the token slices of each
// microbatch's sequence (`slice_lengths`; empty = one slice).
Schedule build_schedule(ScheduleKind kind, int pp, int stages, int microbatches,
                        const std::vector<int64_t>& slice_lengths = {});

// Reads a schedule of compute actions from CSV (one row per rank, cells like "0F0", "1I3",
// "1W3", "2B0"; empty cells ignored), PyTorch's compute-only format, and inserts the sends and
// receives. Stages and microbatches are taken from the file; errors name the file, row and cell.
Schedule schedule_from_csv(const std::string& path, int pp, bool v);
// The inverse: the compute actions of `s` as CSV text.
std::string schedule_to_csv(const Schedule& s);

// Proves `s` well-formed: every stage's forward of every microbatch exactly once and on the
// stage's rank, each backward after its forward (weights after inputs), token slices of a
// sequence forward in order and backward in reverse on every stage, every gradient
// accumulated exactly once, every send matched by a receive (same order on each link), and
// an execution that cannot deadlock with asynchronous sends and blocking receives. Throws
// titan::Error describing the first violation.
void check_schedule(const Schedule& s);

struct ActionCosts {
  double forward = 1, backward_input = 1, backward_weight = 1;  // per stage
  double transfer = 0;  // from the end of a send to the start of the consumer
  // Optional per-microbatch factor on every cost (TeraPipe: slices of different times).
  std::vector<double> microbatch_scale;
};

struct TimedAction {
  Action action;
  double start = 0, end = 0;
};

struct Simulation {
  double makespan = 0;
  // The pipeline bubble as the zero-bubble paper counts it: idle time between a rank's first
  // and last action as a fraction of that span, on the worst rank. The ramp before a rank's
  // first action and after its last (the parallelogram of fill and drain) is not a bubble.
  double bubble = 0;
  double step_idle = 0;             // 1 - busy / (ranks x makespan): fill and drain included
  std::vector<double> busy;         // compute time per rank
  std::vector<int> peak_in_flight;  // most microbatches with saved activations, per rank
  std::vector<std::vector<TimedAction>> timeline;  // compute actions per rank
};

// Runs `s` with the given costs (B = I + W), respecting every dependency.
Simulation simulate(const Schedule& s, const ActionCosts& costs);

// A text timeline: one row per rank, one column per time unit of the simulation's smallest
// cost; cells are "F3", "I3", "W3", "B3" (microbatch) with the stage's local index.
std::string render_timeline(const Schedule& s, const Simulation& sim);

// `titan_train schedule ...`: prints a schedule's timeline and bubble. Returns the exit code.
int run_schedule_command(const std::vector<std::string>& args);

}  // namespace titan::parallel::pipeline
