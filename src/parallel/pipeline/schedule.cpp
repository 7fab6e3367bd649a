// Schedule generators (fixed orders for GPipe, 1F1B, Interleaved 1F1B and looped BFS; a
// dependency-driven list scheduler for the zero-bubble schedules), the insertion of sends and
// receives, the checker, the simulator and the text timeline.
#include "titan/parallel/pipeline/schedule.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <deque>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "titan/util/error.h"
#include "titan/util/strings.h"

namespace titan::parallel::pipeline {
namespace {

struct KindName {
  ScheduleKind kind;
  const char* name;
};
constexpr KindName kKinds[] = {
    {ScheduleKind::GPipe, "GPipe"},
    {ScheduleKind::OneFOneB, "1F1B"},
    {ScheduleKind::Interleaved1F1B, "Interleaved1F1B"},
    {ScheduleKind::LoopedBFS, "LoopedBFS"},
    {ScheduleKind::InterleavedZeroBubble, "InterleavedZeroBubble"},
    {ScheduleKind::ZBVZeroBubble, "ZBVZeroBubble"},
    {ScheduleKind::TeraPipe, "TeraPipe"},
};
// The zero-bubble papers' short names, accepted for PyTorch's.
constexpr KindName kAliases[] = {
    {ScheduleKind::InterleavedZeroBubble, "ZB1P"},
    {ScheduleKind::ZBVZeroBubble, "ZBV"},
};

using Key = std::pair<int, int>;  // (stage, microbatch)

bool is_backward(ActionType t) {
  return t == ActionType::Backward || t == ActionType::BackwardInput;
}

}  // namespace

const char* schedule_name(ScheduleKind kind) {
  for (const auto& k : kKinds) {
    if (k.kind == kind) return k.name;
  }
  return "?";
}

ScheduleKind parse_schedule(const std::string& name, const std::string& key) {
  std::vector<std::string> names;
  for (const auto& k : kKinds) {
    if (util::lower(name) == util::lower(k.name)) return k.kind;
    names.push_back(k.name);
  }
  for (const auto& k : kAliases) {
    if (util::lower(name) == util::lower(k.name)) return k.kind;
  }
  const std::string near = util::nearest(name, names);
  fail(key, ": unknown pipeline schedule \"", name, "\"; expected one of ", util::join(names, ", "),
       " (case-insensitive)", near.empty() ? "" : "; did you mean \"" + near + "\"?");
}

bool multi_stage(ScheduleKind kind) {
  return kind == ScheduleKind::Interleaved1F1B || kind == ScheduleKind::LoopedBFS ||
         kind == ScheduleKind::InterleavedZeroBubble || kind == ScheduleKind::ZBVZeroBubble;
}

bool v_placement(ScheduleKind kind) {
  return kind == ScheduleKind::ZBVZeroBubble;
}

bool splits_weight(ScheduleKind kind) {
  return kind == ScheduleKind::InterleavedZeroBubble || kind == ScheduleKind::ZBVZeroBubble;
}

const char* action_code(ActionType t) {
  switch (t) {
    case ActionType::Forward: return "F";
    case ActionType::Backward: return "B";
    case ActionType::BackwardInput: return "I";
    case ActionType::BackwardWeight: return "W";
    case ActionType::SendActivation: return "SEND_F";
    case ActionType::RecvActivation: return "RECV_F";
    case ActionType::SendGradient: return "SEND_B";
    case ActionType::RecvGradient: return "RECV_B";
  }
  return "?";
}

bool is_compute(ActionType t) {
  return t == ActionType::Forward || t == ActionType::Backward || t == ActionType::BackwardInput ||
         t == ActionType::BackwardWeight;
}

std::string Action::str() const {
  return std::to_string(stage) + action_code(type) + std::to_string(microbatch);
}

std::vector<int> Schedule::stages_of(int rank) const {
  std::vector<int> out;
  for (int s = 0; s < stages; ++s) {
    if (stage_rank[static_cast<size_t>(s)] == rank) out.push_back(s);
  }
  return out;
}

std::vector<int> stage_ranks(int pp, int stages, bool v) {
  std::vector<int> out(static_cast<size_t>(stages));
  for (int s = 0; s < stages; ++s) {
    if (v) {
      const int round = s / pp, pos = s % pp;
      out[static_cast<size_t>(s)] = round % 2 == 0 ? pos : pp - 1 - pos;
    } else {
      out[static_cast<size_t>(s)] = s % pp;
    }
  }
  return out;
}

namespace {

Action compute(ActionType t, int stage, int mb) {
  Action a;
  a.type = t;
  a.stage = stage;
  a.microbatch = mb;
  return a;
}

// Megatron's interleaved order: virtual step k of rank r -> (local chunk, microbatch).
std::pair<int, int> interleaved_step(int k, int pp, int v, bool backward) {
  const int chunk = (k / pp) % v;
  const int mb = (k / (pp * v)) * pp + k % pp;
  return {backward ? v - 1 - chunk : chunk, mb};
}

std::vector<std::vector<Action>> fixed_orders(ScheduleKind kind, int pp, int stages, int m,
                                              const std::vector<int>& stage_rank) {
  std::vector<std::vector<Action>> out(static_cast<size_t>(pp));
  const int v = stages / pp;
  for (int r = 0; r < pp; ++r) {
    auto& a = out[static_cast<size_t>(r)];
    std::vector<int> mine;
    for (int s = 0; s < stages; ++s) {
      if (stage_rank[static_cast<size_t>(s)] == r) mine.push_back(s);
    }
    switch (kind) {
      case ScheduleKind::GPipe:
        for (int mb = 0; mb < m; ++mb) a.push_back(compute(ActionType::Forward, r, mb));
        for (int mb = 0; mb < m; ++mb) a.push_back(compute(ActionType::Backward, r, mb));
        break;
      case ScheduleKind::TeraPipe:
        // Slices enter in order; the backward runs them in reverse, so each slice's key/value
        // gradients from the later slices of its sequence are complete before it runs.
        for (int mb = 0; mb < m; ++mb) a.push_back(compute(ActionType::Forward, r, mb));
        for (int mb = m - 1; mb >= 0; --mb) a.push_back(compute(ActionType::Backward, r, mb));
        break;
      case ScheduleKind::OneFOneB: {
        const int warmup = std::min(pp - 1 - r, m);
        for (int mb = 0; mb < warmup; ++mb) a.push_back(compute(ActionType::Forward, r, mb));
        for (int i = 0; i + warmup < m; ++i) {
          a.push_back(compute(ActionType::Forward, r, warmup + i));
          a.push_back(compute(ActionType::Backward, r, i));
        }
        for (int mb = std::max(0, m - warmup); mb < m; ++mb) {
          a.push_back(compute(ActionType::Backward, r, mb));
        }
        break;
      }
      case ScheduleKind::LoopedBFS:
        for (int s : mine) {
          for (int mb = 0; mb < m; ++mb) a.push_back(compute(ActionType::Forward, s, mb));
        }
        for (auto it = mine.rbegin(); it != mine.rend(); ++it) {
          for (int mb = 0; mb < m; ++mb) a.push_back(compute(ActionType::Backward, *it, mb));
        }
        break;
      case ScheduleKind::Interleaved1F1B: {
        const int total = m * v;
        const int warmup = std::min(total, (pp - r - 1) * 2 + (v - 1) * pp);
        auto f = [&](int k) {
          auto [c, mb] = interleaved_step(k, pp, v, false);
          a.push_back(compute(ActionType::Forward, c * pp + r, mb));
        };
        auto b = [&](int k) {
          auto [c, mb] = interleaved_step(k, pp, v, true);
          a.push_back(compute(ActionType::Backward, c * pp + r, mb));
        };
        for (int k = 0; k < warmup; ++k) f(k);
        for (int i = 0; i + warmup < total; ++i) {
          f(warmup + i);
          b(i);
        }
        for (int k = total - warmup; k < total; ++k) b(k);
        break;
      }
      default: internal_fail("fixed_orders: ", schedule_name(kind));
    }
  }
  return out;
}

// Zero bubble from a fixed order (ZB-H1's construction, interleaved): the forward and
// input-gradient passes keep the order of `base` (Interleaved 1F1B, with each backward split
// into I and W), and each weight-gradient pass is deferred into the first slot where the rank
// would otherwise wait, or run at once when `limit` microbatches' activations are alive. A
// unit-cost simulation places them; its order is the schedule.
std::vector<std::vector<Action>> fill_weight_passes(const std::vector<std::vector<Action>>& base,
                                                    int pp, int stages,
                                                    const std::vector<int>& stage_rank,
                                                    const std::vector<int>& limit) {
  const size_t P = static_cast<size_t>(pp);
  std::vector<std::vector<Action>> out(P);
  std::vector<size_t> pc(P, 0);
  std::vector<int> in_flight(P, 0);
  std::vector<std::deque<Key>> pending_w(P);
  std::map<Key, int> f_done, i_done;
  size_t remaining = 0;
  for (const auto& b : base) remaining += 2 * b.size();  // each B becomes I + W; F counted twice
  for (const auto& b : base) {
    for (const auto& a : b) remaining -= a.type == ActionType::Forward ? 1 : 0;
  }
  for (int t = 0; remaining > 0; ++t) {
    TITAN_INTERNAL_CHECK(t < 1000000, "weight-pass placement made no progress");
    for (size_t r = 0; r < P; ++r) {
      auto done = [&](const std::map<Key, int>& d, Key k) {
        auto it = d.find(k);
        return it != d.end() && it->second <= t;
      };
      bool ran = false;
      if (pc[r] < base[r].size()) {
        const Action& a = base[r][pc[r]];
        const Key k{a.stage, a.microbatch};
        const bool f = a.type == ActionType::Forward;
        const bool ready = f ? (a.stage == 0 || done(f_done, {a.stage - 1, a.microbatch}))
                             : (done(f_done, k) && (a.stage + 1 == stages ||
                                                    done(i_done, {a.stage + 1, a.microbatch})));
        const bool room = !f || in_flight[r] < limit[r] || pending_w[r].empty();
        if (ready && room) {
          if (f) {
            out[r].push_back(compute(ActionType::Forward, a.stage, a.microbatch));
            f_done[k] = t + 1;
            ++in_flight[r];
          } else {
            out[r].push_back(compute(ActionType::BackwardInput, a.stage, a.microbatch));
            i_done[k] = t + 1;
            pending_w[r].push_back(k);
          }
          ++pc[r];
          ran = true;
        }
      }
      if (!ran && !pending_w[r].empty()) {
        const Key k = pending_w[r].front();
        pending_w[r].pop_front();
        out[r].push_back(compute(ActionType::BackwardWeight, k.first, k.second));
        --in_flight[r];
        ran = true;
      }
      if (ran) --remaining;
    }
  }
  (void)stage_rank;
  return out;
}

// ZB-V (the zero-bubble paper's V schedule, section 6): rank r holds chunk 0 = stage r and
// chunk 1 = stage 2p - 1 - r. Warm-up: 2(p - r) - 1 chunk-0 forwards, r pairs of chunk-1 and
// chunk-0 forwards, then p - r rounds of chunk-1 F, I, W; steady state: F0 I0 W0 F1 I1 W1;
// cool-down: r pairs I0 I1, p - r pairs I0 W0, then the remaining W1 and W0. With equal F, I and
// W costs and m >= 2p microbatches no rank waits between its first and last action. Fewer than
// 2p - 1 microbatches are scheduled as 2p - 1 with the missing ones left out.
std::vector<Action> zbv_rank_order(int pp, int r, int m) {
  const int n = std::max(2 * pp - 1, m);
  const int c0 = r, c1 = 2 * pp - 1 - r;
  int f0 = 0, f1 = 0, i0 = 0, i1 = 0, w0 = 0, w1 = 0;
  std::vector<Action> a;
  auto add = [&](ActionType t, int stage, int& counter) {
    if (counter < m) a.push_back(compute(t, stage, counter));
    ++counter;
  };
  for (int k = 0; k < 2 * (pp - r) - 1; ++k) add(ActionType::Forward, c0, f0);
  for (int k = 0; k < r; ++k) {
    add(ActionType::Forward, c1, f1);
    add(ActionType::Forward, c0, f0);
  }
  for (int k = 0; k < pp - r; ++k) {
    add(ActionType::Forward, c1, f1);
    add(ActionType::BackwardInput, c1, i1);
    add(ActionType::BackwardWeight, c1, w1);
  }
  while (f1 < f0 || f0 < n) {
    if (f0 < n) add(ActionType::Forward, c0, f0);
    add(ActionType::BackwardInput, c0, i0);
    add(ActionType::BackwardWeight, c0, w0);
    add(ActionType::Forward, c1, f1);
    add(ActionType::BackwardInput, c1, i1);
    add(ActionType::BackwardWeight, c1, w1);
  }
  for (int k = 0; k < r; ++k) {
    add(ActionType::BackwardInput, c0, i0);
    add(ActionType::BackwardInput, c1, i1);
  }
  for (int k = 0; k < pp - r; ++k) {
    add(ActionType::BackwardInput, c0, i0);
    add(ActionType::BackwardWeight, c0, w0);
  }
  while (w1 < i1) add(ActionType::BackwardWeight, c1, w1);
  while (w0 < i0) add(ActionType::BackwardWeight, c0, w0);
  TITAN_INTERNAL_CHECK(f0 == n && i0 == n && w0 == n && f1 == n && i1 == n && w1 == n,
                       "ZB-V order of rank ", r, " is incomplete");
  return a;
}

// One message between ranks: activation or gradient of (stage, microbatch) leaving `stage`.
struct Message {
  bool gradient = false;
  int stage = 0;  // the producing stage
  int microbatch = 0;
  bool operator==(const Message& o) const {
    return gradient == o.gradient && stage == o.stage && microbatch == o.microbatch;
  }
  std::string str() const {
    return (gradient ? "gradient of stage " : "activation of stage ") + std::to_string(stage) +
           ", microbatch " + std::to_string(microbatch);
  }
};

// The message a compute action sends (producer side) or needs (consumer side), if any.
std::optional<std::pair<Message, int>> outgoing(const Action& a, const Schedule& s) {
  const int r = s.stage_rank[static_cast<size_t>(a.stage)];
  if (a.type == ActionType::Forward && a.stage + 1 < s.stages) {
    const int peer = s.stage_rank[static_cast<size_t>(a.stage + 1)];
    if (peer != r) return std::make_pair(Message{false, a.stage, a.microbatch}, peer);
  }
  if (is_backward(a.type) && a.stage > 0) {
    const int peer = s.stage_rank[static_cast<size_t>(a.stage - 1)];
    if (peer != r) return std::make_pair(Message{true, a.stage, a.microbatch}, peer);
  }
  return std::nullopt;
}

std::optional<std::pair<Message, int>> incoming(const Action& a, const Schedule& s) {
  const int r = s.stage_rank[static_cast<size_t>(a.stage)];
  if (a.type == ActionType::Forward && a.stage > 0) {
    const int peer = s.stage_rank[static_cast<size_t>(a.stage - 1)];
    if (peer != r) return std::make_pair(Message{false, a.stage - 1, a.microbatch}, peer);
  }
  if (is_backward(a.type) && a.stage + 1 < s.stages) {
    const int peer = s.stage_rank[static_cast<size_t>(a.stage + 1)];
    if (peer != r) return std::make_pair(Message{true, a.stage + 1, a.microbatch}, peer);
  }
  return std::nullopt;
}

Action comm_action(const Message& msg, bool send, int peer) {
  Action a;
  if (msg.gradient) {
    // A gradient leaving stage s is received for stage s - 1.
    a.type = send ? ActionType::SendGradient : ActionType::RecvGradient;
    a.stage = send ? msg.stage : msg.stage - 1;
  } else {
    a.type = send ? ActionType::SendActivation : ActionType::RecvActivation;
    a.stage = send ? msg.stage : msg.stage + 1;
  }
  a.microbatch = msg.microbatch;
  a.peer = peer;
  return a;
}

std::optional<Message> message_of(const Action& a) {
  switch (a.type) {
    case ActionType::SendActivation: return Message{false, a.stage, a.microbatch};
    case ActionType::RecvActivation: return Message{false, a.stage - 1, a.microbatch};
    case ActionType::SendGradient: return Message{true, a.stage, a.microbatch};
    case ActionType::RecvGradient: return Message{true, a.stage + 1, a.microbatch};
    default: return std::nullopt;
  }
}

// Inserts sends right after their producers and receives before their consumers, in the order
// the sender sends on each link: a consumer that needs a later message first receives (and
// the runtime buffers) the earlier ones, so messages always match first-in first-out.
void add_communication(Schedule& s) {
  // Sender order per link (from, to).
  std::map<std::pair<int, int>, std::deque<Message>> link;
  for (int r = 0; r < s.pp; ++r) {
    for (const auto& a : s.actions[static_cast<size_t>(r)]) {
      if (auto o = outgoing(a, s)) link[{r, o->second}].push_back(o->first);
    }
  }
  for (int r = 0; r < s.pp; ++r) {
    std::vector<Action> with;
    for (const auto& a : s.actions[static_cast<size_t>(r)]) {
      if (auto in = incoming(a, s)) {
        auto& q = link[{in->second, r}];
        const auto it = std::find(q.begin(), q.end(), in->first);
        if (it != q.end()) {
          const auto n = static_cast<size_t>(it - q.begin()) + 1;
          for (size_t i = 0; i < n; ++i) {
            with.push_back(comm_action(q.front(), /*send=*/false, in->second));
            q.pop_front();
          }
        }
      }
      with.push_back(a);
      if (auto o = outgoing(a, s)) with.push_back(comm_action(o->first, /*send=*/true, o->second));
    }
    s.actions[static_cast<size_t>(r)] = std::move(with);
  }
}

void check_stages(int pp, int stages, ScheduleKind kind) {
  TITAN_CHECK(stages % pp == 0, "pipeline: ", stages, " stages do not divide over ", pp,
              " pipeline ranks (parallelism.pipeline_parallel_degree)");
  if (!multi_stage(kind)) {
    TITAN_CHECK(stages == pp, "pipeline: ", schedule_name(kind),
                " runs one stage per rank, but the split has ", stages, " stages for ", pp,
                " ranks; use a multi-stage schedule (Interleaved1F1B, LoopedBFS, "
                "InterleavedZeroBubble, ZBVZeroBubble) or ",
                pp, " stages");
  }
  if (v_placement(kind)) {
    TITAN_CHECK(stages == 2 * pp, "pipeline: ", schedule_name(kind),
                " places exactly two stages on each rank (a V), but the split has ", stages,
                " stages for ", pp, " ranks");
  }
}

}  // namespace

Schedule build_schedule(ScheduleKind kind, int pp, int stages, int microbatches,
                        const std::vector<int64_t>& slice_lengths) {
  TITAN_CHECK(pp >= 1 && microbatches >= 1, "pipeline: need at least one rank and microbatch");
  check_stages(pp, stages, kind);
  TITAN_INTERNAL_CHECK(slice_lengths.empty() || kind == ScheduleKind::TeraPipe,
                       "pipeline: token slices for ", schedule_name(kind));
  if (kind == ScheduleKind::Interleaved1F1B || kind == ScheduleKind::InterleavedZeroBubble) {
    TITAN_CHECK(stages == pp || microbatches % pp == 0, "pipeline: ", schedule_name(kind),
                " runs microbatches in rounds of one per rank, so the number of microbatches (",
                microbatches, ") must be a multiple of parallelism.pipeline_parallel_degree (", pp,
                "); adjust training.local_batch_size or pipeline_parallel_microbatch_size");
  }
  Schedule s;
  s.name = schedule_name(kind);
  s.pp = pp;
  s.stages = stages;
  s.microbatches = microbatches;
  if (!slice_lengths.empty()) {
    s.slices = static_cast<int>(slice_lengths.size());
    s.slice_lengths = slice_lengths;
    s.microbatches = microbatches * s.slices;
  }
  s.stage_rank = stage_ranks(pp, stages, v_placement(kind));
  if (kind == ScheduleKind::ZBVZeroBubble) {
    s.actions.resize(static_cast<size_t>(pp));
    for (int r = 0; r < pp; ++r)
      s.actions[static_cast<size_t>(r)] = zbv_rank_order(pp, r, microbatches);
  } else if (kind == ScheduleKind::InterleavedZeroBubble) {
    // Interleaved 1F1B's order; its activation depth per rank bounds the memory.
    const auto base =
        fixed_orders(ScheduleKind::Interleaved1F1B, pp, stages, microbatches, s.stage_rank);
    std::vector<int> limit(static_cast<size_t>(pp));
    for (int r = 0; r < pp; ++r) {
      int depth = 0, peak = 0;
      for (const auto& a : base[static_cast<size_t>(r)]) {
        depth += a.type == ActionType::Forward ? 1 : -1;
        peak = std::max(peak, depth);
      }
      // One microbatch-stage beyond 1F1B's depth lets the deferred W passes fill the tail:
      // about a third of 1F1B's bubble (p 4, m 16: 0.050 against 0.158).
      limit[static_cast<size_t>(r)] = peak + 1;
    }
    s.actions = fill_weight_passes(base, pp, stages, s.stage_rank, limit);
  } else {
    s.actions = fixed_orders(kind, pp, stages, s.microbatches, s.stage_rank);
  }
  add_communication(s);
  return s;
}

Schedule schedule_from_csv(const std::string& path, int pp, bool v) {
  std::ifstream in(path);
  TITAN_CHECK(in.good(), "parallelism.pipeline_parallel_schedule_csv: cannot open ", path);
  Schedule s;
  s.name = "CSV " + path;
  s.pp = pp;
  std::string line;
  int row = 0, max_stage = -1, max_mb = -1;
  while (std::getline(in, line)) {
    ++row;
    if (util::trim(line).empty()) continue;
    TITAN_CHECK(static_cast<int>(s.actions.size()) < pp, path, ":", row,
                ": more rows than pipeline ranks (", pp, ")");
    std::vector<Action> acts;
    int col = 0;
    for (const auto& raw : util::split(line, ',')) {
      ++col;
      const std::string cell = util::trim(raw);
      if (cell.empty()) continue;
      size_t i = 0;
      while (i < cell.size() && std::isdigit(static_cast<unsigned char>(cell[i]))) ++i;
      size_t j = i;
      while (j < cell.size() && std::isalpha(static_cast<unsigned char>(cell[j]))) ++j;
      const std::string code = cell.substr(i, j - i);
      int64_t stage = -1, mb = -1;
      const bool ok = i > 0 && j < cell.size() && util::parse_int(cell.substr(0, i), stage) &&
                      util::parse_int(cell.substr(j), mb) &&
                      (code == "F" || code == "B" || code == "I" || code == "W");
      TITAN_CHECK(ok, path, ":", row, ": cell ", col, " \"", cell,
                  "\" is not an action like 0F1 (stage, F/B/I/W, microbatch)");
      const ActionType t = code == "F"   ? ActionType::Forward
                           : code == "B" ? ActionType::Backward
                           : code == "I" ? ActionType::BackwardInput
                                         : ActionType::BackwardWeight;
      acts.push_back(compute(t, static_cast<int>(stage), static_cast<int>(mb)));
      max_stage = std::max<int>(max_stage, static_cast<int>(stage));
      max_mb = std::max<int>(max_mb, static_cast<int>(mb));
    }
    s.actions.push_back(std::move(acts));
  }
  TITAN_CHECK(static_cast<int>(s.actions.size()) == pp, path, ": ", s.actions.size(),
              " rows of actions, but there are ", pp, " pipeline ranks (one row each)");
  s.stages = max_stage + 1;
  s.microbatches = max_mb + 1;
  TITAN_CHECK(s.stages % pp == 0, path, ": ", s.stages, " stages do not divide over ", pp,
              " pipeline ranks");
  s.stage_rank = stage_ranks(pp, s.stages, v);
  for (int r = 0; r < pp; ++r) {
    for (const auto& a : s.actions[static_cast<size_t>(r)]) {
      TITAN_CHECK(s.stage_rank[static_cast<size_t>(a.stage)] == r, path, ": row ", r + 1, " (rank ",
                  r, ") runs ", a.str(), ", but stage ", a.stage, " belongs to rank ",
                  s.stage_rank[static_cast<size_t>(a.stage)]);
    }
  }
  add_communication(s);
  return s;
}

std::string schedule_to_csv(const Schedule& s) {
  std::ostringstream out;
  for (const auto& row : s.actions) {
    bool first = true;
    for (const auto& a : row) {
      if (!is_compute(a.type)) continue;
      out << (first ? "" : ",") << a.str();
      first = false;
    }
    out << "\n";
  }
  return out.str();
}

void check_schedule(const Schedule& s) {
  const std::string where = "pipeline schedule " + s.name + ": ";
  std::map<Key, int> forwards, inputs, weights;
  for (int r = 0; r < s.pp; ++r) {
    std::set<Key> f_seen, i_seen;
    for (const auto& a : s.actions[static_cast<size_t>(r)]) {
      if (!is_compute(a.type)) continue;
      TITAN_CHECK(
          a.stage >= 0 && a.stage < s.stages && a.microbatch >= 0 && a.microbatch < s.microbatches,
          where, "rank ", r, " runs ", a.str(), " outside ", s.stages, " stages x ", s.microbatches,
          " microbatches");
      TITAN_CHECK(s.stage_rank[static_cast<size_t>(a.stage)] == r, where, "rank ", r, " runs ",
                  a.str(), ", but stage ", a.stage, " lives on rank ",
                  s.stage_rank[static_cast<size_t>(a.stage)]);
      const Key k{a.stage, a.microbatch};
      const int slice = a.microbatch % s.slices;
      if (a.type == ActionType::Forward && slice > 0) {
        TITAN_CHECK(f_seen.count({a.stage, a.microbatch - 1}), where, "rank ", r, " runs ", a.str(),
                    " before the forward of the token slice before it (", a.stage, "F",
                    a.microbatch - 1, "), whose keys and values it attends to");
      }
      if (is_backward(a.type) && slice + 1 < s.slices) {
        TITAN_CHECK(i_seen.count({a.stage, a.microbatch + 1}), where, "rank ", r, " runs ", a.str(),
                    " before the backward of the token slice after it (", a.stage, "B",
                    a.microbatch + 1, "), which adds to its key/value gradients");
      }
      switch (a.type) {
        case ActionType::Forward:
          ++forwards[k];
          f_seen.insert(k);
          break;
        case ActionType::Backward:
          TITAN_CHECK(f_seen.count(k), where, "rank ", r, " runs ", a.str(), " before its forward");
          ++inputs[k];
          ++weights[k];
          i_seen.insert(k);
          break;
        case ActionType::BackwardInput:
          TITAN_CHECK(f_seen.count(k), where, "rank ", r, " runs ", a.str(), " before its forward");
          ++inputs[k];
          i_seen.insert(k);
          break;
        case ActionType::BackwardWeight:
          TITAN_CHECK(i_seen.count(k), where, "rank ", r, " runs ", a.str(),
                      " before the input gradient of that microbatch");
          ++weights[k];
          break;
        default: break;
      }
    }
  }
  for (int st = 0; st < s.stages; ++st) {
    for (int mb = 0; mb < s.microbatches; ++mb) {
      const Key k{st, mb};
      const std::string what = "stage " + std::to_string(st) + ", microbatch " + std::to_string(mb);
      TITAN_CHECK(forwards[k] == 1, where, what, " runs forward ", forwards[k], " times");
      TITAN_CHECK(inputs[k] == 1, where, what, " computes its input gradient ", inputs[k],
                  " times");
      TITAN_CHECK(weights[k] == 1, where, what, " accumulates its weight gradient ", weights[k],
                  " times");
    }
  }
  // Execution with asynchronous sends and blocking receives, matching first-in first-out per
  // link; a stage's computation also waits for the local results it needs.
  std::vector<size_t> pc(static_cast<size_t>(s.pp), 0);
  std::map<std::pair<int, int>, std::vector<Message>> sent;
  std::map<std::pair<int, int>, size_t> received;
  std::set<Key> f_done, i_done;
  std::set<std::pair<Message, int>,
           bool (*)(const std::pair<Message, int>&, const std::pair<Message, int>&)>
      arrived([](const std::pair<Message, int>& a, const std::pair<Message, int>& b) {
        return std::make_tuple(a.first.gradient, a.first.stage, a.first.microbatch, a.second) <
               std::make_tuple(b.first.gradient, b.first.stage, b.first.microbatch, b.second);
      });
  bool progress = true;
  while (progress) {
    progress = false;
    for (int r = 0; r < s.pp; ++r) {
      auto& i = pc[static_cast<size_t>(r)];
      const auto& acts = s.actions[static_cast<size_t>(r)];
      while (i < acts.size()) {
        const Action& a = acts[i];
        if (a.type == ActionType::SendActivation || a.type == ActionType::SendGradient) {
          sent[{r, a.peer}].push_back(*message_of(a));
        } else if (a.type == ActionType::RecvActivation || a.type == ActionType::RecvGradient) {
          auto& n = received[{a.peer, r}];
          const auto& q = sent[{a.peer, r}];
          if (n >= q.size()) break;  // blocks until the peer sends
          TITAN_CHECK(q[n] == *message_of(a), where, "link ", a.peer, " -> ", r, ": receive #",
                      n + 1, " expects the ", message_of(a)->str(), " but the sender's #", n + 1,
                      " is the ", q[n].str());
          ++n;
          arrived.insert({*message_of(a), r});
        } else {
          const Key k{a.stage, a.microbatch};
          if (a.type == ActionType::Forward && a.stage > 0) {
            const bool local = s.stage_rank[static_cast<size_t>(a.stage - 1)] == r;
            if (local ? !f_done.count({a.stage - 1, a.microbatch})
                      : !arrived.count({Message{false, a.stage - 1, a.microbatch}, r})) {
              if (local) break;
              TITAN_CHECK(false, where, "rank ", r, " runs ", a.str(),
                          " without having received its input");
            }
          }
          if (is_backward(a.type) && a.stage + 1 < s.stages) {
            const bool local = s.stage_rank[static_cast<size_t>(a.stage + 1)] == r;
            if (local ? !i_done.count({a.stage + 1, a.microbatch})
                      : !arrived.count({Message{true, a.stage + 1, a.microbatch}, r})) {
              if (local) break;
              TITAN_CHECK(false, where, "rank ", r, " runs ", a.str(),
                          " without having received its output's gradient");
            }
          }
          if (a.type == ActionType::Forward) f_done.insert(k);
          if (is_backward(a.type)) i_done.insert(k);
        }
        ++i;
        progress = true;
      }
    }
  }
  for (int r = 0; r < s.pp; ++r) {
    const auto i = pc[static_cast<size_t>(r)];
    const auto& acts = s.actions[static_cast<size_t>(r)];
    TITAN_CHECK(i == acts.size(), where, "deadlock: rank ", r, " waits forever at action ", i + 1,
                " (", acts[i].str(),
                acts[i].peer >= 0 ? " from rank " + std::to_string(acts[i].peer) : "", ")");
  }
  for (const auto& [l, q] : sent) {
    TITAN_CHECK(received[l] == q.size(), where, "link ", l.first, " -> ", l.second, " sends ",
                q.size(), " messages but receives ", received[l]);
  }
}

Simulation simulate(const Schedule& s, const ActionCosts& c) {
  Simulation sim;
  const size_t P = static_cast<size_t>(s.pp);
  sim.busy.assign(P, 0);
  sim.peak_in_flight.assign(P, 0);
  sim.timeline.assign(P, {});
  std::vector<size_t> pc(P, 0);
  std::vector<double> clock(P, 0);
  std::vector<int> in_flight(P, 0);
  std::map<std::pair<Message, int>, double,
           bool (*)(const std::pair<Message, int>&, const std::pair<Message, int>&)>
      ready([](const std::pair<Message, int>& a, const std::pair<Message, int>& b) {
        return std::make_tuple(a.first.gradient, a.first.stage, a.first.microbatch, a.second) <
               std::make_tuple(b.first.gradient, b.first.stage, b.first.microbatch, b.second);
      });
  std::map<Key, double> f_end, i_end;
  bool progress = true;
  size_t remaining = 0;
  for (const auto& a : s.actions) remaining += a.size();
  while (remaining > 0 && progress) {
    progress = false;
    for (size_t r = 0; r < P; ++r) {
      while (pc[r] < s.actions[r].size()) {
        const Action& a = s.actions[r][pc[r]];
        double start = clock[r];
        if (a.type == ActionType::SendActivation || a.type == ActionType::SendGradient) {
          ready[{*message_of(a), a.peer}] = clock[r] + c.transfer;
        } else if (a.type == ActionType::RecvActivation || a.type == ActionType::RecvGradient) {
          auto it = ready.find({*message_of(a), static_cast<int>(r)});
          if (it == ready.end()) break;
          clock[r] = std::max(clock[r], it->second);
        } else {
          const Key k{a.stage, a.microbatch};
          // Local dependencies (a V's turn, or two stages on one rank).
          if (a.type == ActionType::Forward && a.stage > 0 &&
              s.stage_rank[static_cast<size_t>(a.stage - 1)] == static_cast<int>(r)) {
            auto it = f_end.find({a.stage - 1, a.microbatch});
            if (it == f_end.end()) break;
            start = std::max(start, it->second);
          }
          if (is_backward(a.type) && a.stage + 1 < s.stages &&
              s.stage_rank[static_cast<size_t>(a.stage + 1)] == static_cast<int>(r)) {
            auto it = i_end.find({a.stage + 1, a.microbatch});
            if (it == i_end.end()) break;
            start = std::max(start, it->second);
          }
          double cost = 0;
          switch (a.type) {
            case ActionType::Forward: cost = c.forward; break;
            case ActionType::Backward: cost = c.backward_input + c.backward_weight; break;
            case ActionType::BackwardInput: cost = c.backward_input; break;
            default: cost = c.backward_weight; break;
          }
          if (!c.microbatch_scale.empty()) {
            cost *= c.microbatch_scale.at(static_cast<size_t>(a.microbatch));
          }
          const double end = start + cost;
          if (a.type == ActionType::Forward) {
            f_end[k] = end;
            ++in_flight[r];
          }
          if (is_backward(a.type)) i_end[k] = end;
          if (a.type == ActionType::Backward || a.type == ActionType::BackwardWeight)
            --in_flight[r];
          sim.peak_in_flight[r] = std::max(sim.peak_in_flight[r], in_flight[r]);
          sim.timeline[r].push_back({a, start, end});
          sim.busy[r] += cost;
          clock[r] = end;
        }
        ++pc[r];
        --remaining;
        progress = true;
      }
    }
  }
  TITAN_INTERNAL_CHECK(remaining == 0, "simulate: schedule ", s.name, " deadlocks");
  for (double t : clock) sim.makespan = std::max(sim.makespan, t);
  for (size_t r = 0; r < P; ++r) {
    if (sim.timeline[r].empty()) continue;
    const double span = sim.timeline[r].back().end - sim.timeline[r].front().start;
    if (span > 0) sim.bubble = std::max(sim.bubble, 1.0 - sim.busy[r] / span);
  }
  double busy = 0;
  for (double b : sim.busy) busy += b;
  sim.step_idle = sim.makespan > 0 ? 1.0 - busy / (static_cast<double>(P) * sim.makespan) : 0.0;
  return sim;
}

std::string render_timeline(const Schedule& s, const Simulation& sim) {
  double unit = 0;
  for (const auto& row : sim.timeline) {
    for (const auto& t : row) {
      const double d = t.end - t.start;
      if (d > 0 && (unit == 0 || d < unit)) unit = d;
    }
  }
  if (unit <= 0) unit = 1;
  const int cols = static_cast<int>(std::ceil(sim.makespan / unit - 1e-9));
  size_t width = 2;
  for (const auto& row : sim.timeline) {
    for (const auto& t : row) width = std::max(width, t.action.str().size());
  }
  std::ostringstream out;
  for (int r = 0; r < s.pp; ++r) {
    std::vector<std::string> cells(static_cast<size_t>(cols), std::string(width, '.'));
    for (const auto& t : sim.timeline[static_cast<size_t>(r)]) {
      const int a = static_cast<int>(std::lround(t.start / unit));
      const int b = std::max(a + 1, static_cast<int>(std::lround(t.end / unit)));
      for (int x = a; x < b && x < cols; ++x) {
        std::string label = x == a ? t.action.str() : std::string(t.action.str().size(), '-');
        label.resize(width, ' ');
        cells[static_cast<size_t>(x)] = label;
      }
    }
    out << "rank " << r << " |";
    for (const auto& c : cells) out << ' ' << c;
    out << "\n";
  }
  return out.str();
}

}  // namespace titan::parallel::pipeline
