// titan_tokenize: pre-tokenizes text/JSONL files into binary token shards for titan_train,
// trains small BPE tokenizers (tiktoken format), and exports the built-in corpus as JSONL.
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "titan/data/bpe_trainer.h"
#include "titan/data/corpus.h"
#include "titan/data/text_reader.h"
#include "titan/data/token_shard.h"
#include "titan/data/tokenizer.h"
#include "titan/util/error.h"
#include "titan/util/fs.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"

namespace {

namespace fs = std::filesystem;
using namespace titan;
using Clock = std::chrono::steady_clock;

constexpr const char* kUsage = R"(usage:
  titan_tokenize [options] --output DIR INPUT...
      Tokenizes text (.txt) and JSON-lines (.jsonl/.json) files, each may be .gz, or folders
      of them into binary shards DIR/shard_00000.bin, ... for training.dataset_path. Each
      document is framed as BOS ... EOS. Same formats and document rules as titan_train (docs/DATA.md).
  titan_tokenize --train_bpe N --output tokenizer.model INPUT...
      Trains a byte-level BPE with N ranks (256 bytes + N - 256 merges) on the inputs and
      writes it in tiktoken format (Llama 3's pre-tokenizer regex and special tokens apply).
  titan_tokenize --export_corpus N [--split train|validation] --output FILE.jsonl
      Writes the first N documents of titan's built-in corpus as JSON lines.

options:
  --tokenizer_path PATH   tokenizer.json or tiktoken tokenizer.model (as model.tokenizer_path)
  --hf_assets_path DIR    folder with a tokenizer (as model.hf_assets_path)
                          neither: the byte tokenizer
  --text_field NAME       JSONL field holding the text (default: text)
  --shard_tokens N        tokens per shard (default: 100000000)
  --dtype auto|uint16|uint32   token width (default auto: uint16 when the vocabulary fits)
  --threads N             tokenizer threads (default: all cores)
  --overwrite             replace existing shards in DIR
  --help
)";

struct Options {
  std::vector<std::string> inputs;
  std::string output;
  std::string tokenizer_path, hf_assets_path;
  std::string text_field = "text";
  int64_t shard_tokens = 100000000;
  std::string dtype = "auto";
  int64_t threads = 0;
  bool overwrite = false;
  int64_t train_bpe = 0;
  int64_t export_corpus = 0;
  std::string split = "train";
};

int64_t parse_count(const std::string& key, const std::string& value, int64_t min) {
  int64_t v = 0;
  TITAN_CHECK(util::parse_int(value, v) && v >= min, "--", key, ": expected an integer >= ", min,
              ", got \"", value, "\"");
  return v;
}

Options parse_args(const std::vector<std::string>& args) {
  Options o;
  const std::vector<std::string> keys = {
      "output",  "tokenizer_path", "hf_assets_path", "text_field", "shard_tokens", "dtype",
      "threads", "train_bpe",      "export_corpus",  "split",      "overwrite",    "help"};
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.rfind("--", 0) != 0) {
      o.inputs.push_back(a);
      continue;
    }
    std::string key = a.substr(2), value;
    const bool has_inline = key.find('=') != std::string::npos;
    if (has_inline) {
      value = key.substr(key.find('=') + 1);
      key = key.substr(0, key.find('='));
    }
    if (key == "help") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (key == "overwrite") {
      o.overwrite = true;
      continue;
    }
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) {
      const std::string near = util::nearest(key, keys);
      fail("unknown option --", key, near.empty() ? "" : " (did you mean --" + near + "?)");
    }
    if (!has_inline) {
      TITAN_CHECK(i + 1 < args.size(), "--", key, " needs a value");
      value = args[++i];
    }
    if (key == "output") o.output = value;
    if (key == "tokenizer_path") o.tokenizer_path = value;
    if (key == "hf_assets_path") o.hf_assets_path = value;
    if (key == "text_field") o.text_field = value;
    if (key == "shard_tokens") o.shard_tokens = parse_count(key, value, 1);
    if (key == "dtype") o.dtype = value;
    if (key == "threads") o.threads = parse_count(key, value, 1);
    if (key == "train_bpe") o.train_bpe = parse_count(key, value, 256);
    if (key == "export_corpus") o.export_corpus = parse_count(key, value, 1);
    if (key == "split") o.split = value;
  }
  TITAN_CHECK(!o.output.empty(), "--output is required (see --help)");
  TITAN_CHECK(o.dtype == "auto" || o.dtype == "uint16" || o.dtype == "uint32",
              "--dtype: expected auto, uint16 or uint32, got \"", o.dtype, "\"");
  TITAN_CHECK(o.split == "train" || o.split == "validation",
              "--split: expected train or validation, got \"", o.split, "\"");
  return o;
}

std::string format_seconds(double s) {
  if (!(s >= 0) || s > 1e7) return "?";
  const auto t = static_cast<int64_t>(s);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lld:%02lld:%02lld", static_cast<long long>(t / 3600),
                static_cast<long long>(t / 60 % 60), static_cast<long long>(t % 60));
  return buf;
}

// Input bytes done / total, documents and tokens, rate and ETA, on one stderr line.
class Progress {
 public:
  explicit Progress(int64_t total_bytes)
      : total_(total_bytes), tty_(isatty(2) != 0), start_(Clock::now()), last_(start_) {}
  void update(int64_t bytes, int64_t docs, int64_t tokens, bool final = false) {
    const auto now = Clock::now();
    const double since = std::chrono::duration<double>(now - last_).count();
    if (!final && since < (tty_ ? 0.5 : 10.0)) return;
    last_ = now;
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const double rate = elapsed > 0 ? bytes / elapsed : 0;
    const double eta = rate > 0 ? (total_ - bytes) / rate : -1;
    const double pct = total_ > 0 ? 100.0 * bytes / total_ : 100.0;
    std::fprintf(stderr,
                 "%s[titan_tokenize] %.1f/%.1f MB (%.1f%%) | %s docs | %s tokens | "
                 "%.1f MB/s | %s %s%s",
                 tty_ ? "\r" : "", bytes / 1e6, total_ / 1e6, pct, util::with_commas(docs).c_str(),
                 util::with_commas(tokens).c_str(), rate / 1e6, final ? "elapsed" : "ETA",
                 format_seconds(final ? elapsed : eta).c_str(), tty_ && !final ? "   " : "\n");
    std::fflush(stderr);
  }

 private:
  int64_t total_;
  bool tty_;
  Clock::time_point start_, last_;
};

std::vector<data::TextFile> input_files(const Options& o, int64_t& total_bytes) {
  TITAN_CHECK(!o.inputs.empty(), "no input files or folders given (see --help)");
  std::vector<data::TextFile> files;
  total_bytes = 0;
  for (const auto& in : o.inputs) {
    data::DataFiles found = data::list_data_files(in);
    TITAN_CHECK(found.shards.empty(), "input ", in,
                " holds token shards (.bin); titan_tokenize reads text and JSONL files");
    for (auto& f : found.text) {
      total_bytes += util::file_size(util::path_str(f.path));
      files.push_back(std::move(f));
    }
  }
  return files;
}

// Bytes of the inputs consumed so far.
int64_t bytes_done(const data::TextReader& reader, const std::vector<int64_t>& file_start) {
  const auto f = static_cast<size_t>(reader.file());
  return (f < file_start.size() ? file_start[f] : file_start.back()) + reader.offset();
}

int export_corpus(const Options& o) {
  if (fs::path(o.output).has_parent_path())
    util::make_directories(util::path_str(fs::path(o.output).parent_path()));
  std::ofstream out(o.output, std::ios::binary | std::ios::trunc);
  TITAN_CHECK(out, "cannot write ", o.output);
  const int64_t n = std::min(o.export_corpus, data::corpus_documents(o.split));
  for (int64_t i = 0; i < n; ++i) {
    out << nlohmann::json{{"text", data::corpus_document(o.split, i)}}.dump() << '\n';
  }
  out.flush();
  TITAN_CHECK(out, "error writing ", o.output);
  log::info("wrote {} documents of the built-in corpus ({}) to {}", n, o.split, o.output);
  return 0;
}

// Reads every document of the inputs (JSONL lines without the field are skipped, logged).
template <typename Fn>
int64_t for_each_document(const std::vector<data::TextFile>& files, const std::string& field,
                          Progress& progress, std::vector<int64_t>& file_start, Fn&& fn) {
  data::TextReader reader(files, field);
  data::TextReader::Document doc;
  std::string problem;
  int64_t docs = 0, bad = 0;
  while (reader.next(doc)) {
    if (!reader.extract(doc, problem)) {
      if (++bad <= 50) log::warn("skipping {}", problem);
      continue;
    }
    fn(doc.text);
    ++docs;
    progress.update(bytes_done(reader, file_start), docs, 0);
  }
  if (bad > 0) log::warn("skipped {} invalid JSONL line(s)", bad);
  TITAN_CHECK(docs > 0, "the inputs hold no valid documents");
  return docs;
}

std::vector<int64_t> file_starts(const std::vector<data::TextFile>& files) {
  std::vector<int64_t> start = {0};
  for (const auto& f : files)
    start.push_back(start.back() + util::file_size(util::path_str(f.path)));
  return start;
}

int train_bpe(const Options& o) {
  int64_t total = 0;
  const auto files = input_files(o, total);
  auto starts = file_starts(files);
  Progress progress(total);
  data::BpeTrainer trainer;
  const int64_t docs = for_each_document(files, o.text_field, progress, starts,
                                         [&](const std::string& text) { trainer.add_text(text); });
  progress.update(total, docs, 0, true);
  log::info("training BPE: {} distinct pieces, target {} ranks", trainer.distinct_pieces(),
            o.train_bpe);
  const auto ranks = trainer.train(o.train_bpe);
  if (static_cast<int64_t>(ranks.size()) < o.train_bpe) {
    log::info(
        "the inputs support {} ranks: after that every piece of text is a single token or "
        "no pair occurs twice",
        ranks.size());
  }
  if (fs::path(o.output).has_parent_path())
    util::make_directories(util::path_str(fs::path(o.output).parent_path()));
  data::write_tiktoken_file(o.output, ranks);
  log::info("wrote {} ranks to {} (vocabulary with Llama 3's 256 special tokens: {})", ranks.size(),
            o.output, ranks.size() + 256);
  return 0;
}

int tokenize(const Options& o) {
  int64_t total = 0;
  const auto files = input_files(o, total);
  auto starts = file_starts(files);
  std::shared_ptr<const data::Tokenizer> tok =
      data::build_tokenizer(o.tokenizer_path, o.hf_assets_path);
  log::info("tokenizer: {}", tok->describe());
  const int64_t vocab = tok->vocab_size();
  uint32_t width = o.dtype == "uint16" ? 2 : o.dtype == "uint32" ? 4 : (vocab <= 65536 ? 2 : 4);
  TITAN_CHECK(width == 4 || vocab <= 65536, "--dtype uint16: the tokenizer has ", vocab,
              " ids, more than uint16 holds");

  util::make_directories(util::path_str(o.output));
  TITAN_CHECK(util::is_directory(util::path_str(o.output)), "--output ", o.output,
              " exists but is not a folder; shards go into a folder");
  std::error_code listed;
  fs::directory_iterator entries(o.output, listed);
  TITAN_CHECK(!listed, "--output ", o.output, ": cannot list the folder: ", listed.message());
  for (const auto& e : entries) {
    const std::string name = e.path().filename().string();
    if (name.rfind("shard_", 0) == 0 && e.path().extension() == ".bin") {
      TITAN_CHECK(o.overwrite, "--output ", o.output, " already holds shards (", name,
                  "); pass --overwrite to replace them");
      std::error_code removed;
      fs::remove(e.path(), removed);
      TITAN_CHECK(!removed, "--output ", o.output, ": cannot remove ", name, ": ",
                  removed.message());
    }
  }

  const int64_t threads =
      o.threads > 0 ? o.threads : std::max<int64_t>(1, std::thread::hardware_concurrency());
  Progress progress(total);
  std::unique_ptr<data::ShardWriter> writer;
  int64_t shard_index = 0, tokens = 0, docs = 0, bad = 0;
  std::vector<std::string> written;
  auto emit = [&](const std::vector<int32_t>& ids) {
    size_t at = 0;
    while (at < ids.size()) {
      if (!writer) {
        char name[32];
        std::snprintf(name, sizeof(name), "shard_%05lld.bin",
                      static_cast<long long>(shard_index++));
        writer =
            std::make_unique<data::ShardWriter>((fs::path(o.output) / name).string(), width, vocab);
      }
      const auto room = static_cast<size_t>(o.shard_tokens - writer->tokens());
      const size_t n = std::min(room, ids.size() - at);
      writer->append(ids.data() + at, n);
      at += n;
      if (writer->tokens() == o.shard_tokens) {
        writer->finish();
        written.push_back(writer->path());
        writer.reset();
      }
    }
    tokens += static_cast<int64_t>(ids.size());
  };

  // Batches of documents are tokenized in parallel and written in input order.
  data::TextReader reader(files, o.text_field);
  data::TextReader::Document doc;
  std::string problem;
  constexpr size_t kBatchBytes = 16 << 20;
  std::vector<std::string> batch;
  std::vector<std::vector<int32_t>> encoded;
  bool more = true;
  while (more) {
    batch.clear();
    size_t batch_bytes = 0;
    while (batch_bytes < kBatchBytes && (more = reader.next(doc))) {
      if (!reader.extract(doc, problem)) {
        if (++bad <= 50) log::warn("skipping {}", problem);
        continue;
      }
      batch_bytes += doc.text.size();
      batch.push_back(std::move(doc.text));
    }
    encoded.assign(batch.size(), {});
    std::vector<std::thread> pool;
    const auto t =
        static_cast<size_t>(std::min<int64_t>(threads, static_cast<int64_t>(batch.size())));
    std::vector<std::exception_ptr> errors(t);
    for (size_t w = 0; w < t; ++w) {
      pool.emplace_back([&, w] {
        try {
          for (size_t i = w; i < batch.size(); i += t) {
            auto& ids = encoded[i];
            ids.push_back(tok->bos_id());
            const auto body = tok->encode(batch[i]);
            ids.insert(ids.end(), body.begin(), body.end());
            ids.push_back(tok->eos_id());
          }
        } catch (...) {
          errors[w] = std::current_exception();
        }
      });
    }
    for (auto& th : pool) th.join();
    for (auto& e : errors) {
      if (e) std::rethrow_exception(e);
    }
    for (const auto& ids : encoded) emit(ids);
    docs += static_cast<int64_t>(batch.size());
    progress.update(more ? bytes_done(reader, starts) : total, docs, tokens);
  }
  if (writer && writer->tokens() > 0) {
    writer->finish();
    written.push_back(writer->path());
  }
  writer.reset();
  progress.update(total, docs, tokens, true);
  if (bad > 0) log::warn("skipped {} invalid JSONL line(s)", bad);
  TITAN_CHECK(docs > 0, "the inputs hold no valid documents");
  log::info("wrote {} tokens of {} documents into {} shard(s) under {} ({} per token)",
            util::with_commas(tokens), util::with_commas(docs), written.size(), o.output,
            width == 2 ? "uint16" : "uint32");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::cerr << kUsage;
    return 2;
  }
  try {
    titan::log::init(-1, true, isatty(2) != 0);
    const Options o = parse_args(args);
    if (o.export_corpus > 0) return export_corpus(o);
    if (o.train_bpe > 0) return train_bpe(o);
    return tokenize(o);
  } catch (const titan::Error& e) {
    std::cerr << "titan_tokenize: error: " << e.what() << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "titan_tokenize: internal error: " << e.what() << std::endl;
    return 3;
  }
}
