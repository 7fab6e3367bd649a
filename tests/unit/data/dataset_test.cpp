// Local datasets: text, JSONL and token-shard sources read documents in order, split them
// disjointly over data-parallel ranks, resume exactly through the DataLoader state, and
// report bad data with the file (and line or position) at fault.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <zlib.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <filesystem>
#include <functional>
#include <set>
#include <sstream>

#include "support/test_support.h"
#include "titan/data/dataloader.h"
#include "titan/data/dataset.h"
#include "titan/data/text_reader.h"
#include "titan/data/token_shard.h"
#include "titan/util/error.h"

using namespace titan;
namespace fs = std::filesystem;

namespace {

const std::shared_ptr<const data::Tokenizer> kBytes = std::make_shared<data::ByteTokenizer>();

std::string doc_text(int i) {
  return "document " + std::to_string(i) + std::string(static_cast<size_t>(i % 7), '*') + " ends.";
}

void write_jsonl(const std::string& path, int first, int count) {
  std::string s;
  for (int i = first; i < first + count; ++i) {
    s += nlohmann::json{{"id", i}, {"text", doc_text(i)}}.dump() + "\n";
    if (i % 5 == 0) s += "\n";  // blank lines are not documents
  }
  test::write_file(path, s);
}

void write_text(const std::string& path, int first, int count) {
  std::string s;
  for (int i = first; i < first + count; ++i) {
    s += doc_text(i) + "\nsecond line\n";
    if (i + 1 < first + count) s += "<|endoftext|>\n";
  }
  test::write_file(path, s);
}

// `path` + ".gz": the file gzip-compressed (in two gzip members, as concatenated files are).
void gzip_file(const std::string& path) {
  const std::string text = test::read_file(path);
  gzFile out = gzopen((path + ".gz").c_str(), "wb");
  ASSERT_NE(out, nullptr);
  const size_t half = text.size() / 2;
  ASSERT_EQ(gzwrite(out, text.data(), static_cast<unsigned>(half)), static_cast<int>(half));
  ASSERT_EQ(gzclose(out), Z_OK);
  out = gzopen((path + ".gz").c_str(), "ab");
  ASSERT_NE(out, nullptr);
  const size_t rest = text.size() - half;
  ASSERT_EQ(gzwrite(out, text.data() + half, static_cast<unsigned>(rest)), static_cast<int>(rest));
  ASSERT_EQ(gzclose(out), Z_OK);
  fs::remove(path);
}

std::vector<int32_t> framed(const std::string& text) {
  std::vector<int32_t> ids = {kBytes->bos_id()};
  auto body = kBytes->encode(text);
  ids.insert(ids.end(), body.begin(), body.end());
  ids.push_back(kBytes->eos_id());
  return ids;
}

// Shards holding framed documents; returns each file's tokens.
std::vector<std::vector<int32_t>> write_shards(const std::string& dir, int files, int docs) {
  std::vector<std::vector<int32_t>> all;
  int i = 0;
  for (int f = 0; f < files; ++f) {
    char name[32];
    std::snprintf(name, sizeof(name), "shard_%05d.bin", f);
    data::ShardWriter w(dir + "/" + name, f % 2 == 0 ? 2 : 4, kBytes->vocab_size());
    std::vector<int32_t> tokens;
    for (int d = 0; d < docs; ++d, ++i) {
      auto ids = framed(doc_text(i));
      tokens.insert(tokens.end(), ids.begin(), ids.end());
    }
    w.append(tokens.data(), tokens.size());
    w.finish();
    all.push_back(tokens);
  }
  return all;
}

std::unique_ptr<data::DocumentSource> source(const std::string& path, int64_t rank = 0,
                                             int64_t size = 1, std::string field = "text",
                                             int64_t vocab = 258) {
  data::DatasetOptions o;
  o.name = "local";
  o.path = path;
  o.text_field = std::move(field);
  o.dp_rank = rank;
  o.dp_size = size;
  o.vocab_size = vocab;
  return data::make_source(o, kBytes);
}

// Every document of one epoch.
std::vector<std::vector<int32_t>> read_epoch(data::DocumentSource& s) {
  std::vector<std::vector<int32_t>> docs;
  std::vector<int32_t> d;
  while (s.next(d)) {
    docs.push_back(d);
    d.clear();
  }
  return docs;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const titan::Error& e) {
    return e.what();
  }
  return "(no error)";
}

// Captures what titan::log writes while alive.
class LogCapture {
 public:
  LogCapture() : previous_(spdlog::default_logger()) {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out_);
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("capture", sink));
  }
  ~LogCapture() { spdlog::set_default_logger(previous_); }
  std::string text() const { return out_.str(); }

 private:
  std::shared_ptr<spdlog::logger> previous_;
  std::ostringstream out_;
};

enum class Kind { Jsonl, Text, Shards, Mixed, Gzip };

// A dataset folder of the given kind holding documents 0..n-1 over several files.
std::string make_dataset(const test::TempDir& dir, Kind kind, int n = 13) {
  const std::string root = dir.file("data");
  fs::create_directories(root + "/sub");
  switch (kind) {
    case Kind::Jsonl:
      write_jsonl(root + "/a.jsonl", 0, 5);
      write_jsonl(root + "/sub/b.jsonl", 5, n - 5);
      break;
    case Kind::Text:
      write_text(root + "/a.txt", 0, 4);
      write_text(root + "/sub/b.txt", 4, n - 4);
      break;
    case Kind::Mixed:
      write_text(root + "/a.txt", 0, 4);
      write_jsonl(root + "/b.jsonl", 4, n - 4);
      break;
    case Kind::Shards: write_shards(root, 3, n / 3); break;
    case Kind::Gzip:  // compressed JSON lines and text, as c4's .json.gz
      write_jsonl(root + "/a.json", 0, 5);
      gzip_file(root + "/a.json");
      write_text(root + "/sub/b.txt", 5, n - 5);
      gzip_file(root + "/sub/b.txt");
      break;
  }
  return root;
}

}  // namespace

TEST(Dataset, JsonlDocumentsAreFramedInFileOrder) {
  test::TempDir dir;
  const std::string root = make_dataset(dir, Kind::Jsonl);
  fs::create_directories(root + "/.cache");
  test::write_file(root + "/.cache/z.jsonl", "{\"text\": \"hidden\"}\n");
  test::write_file(root + "/notes.md", "not data\n");
  auto src = source(root);
  const auto docs = read_epoch(*src);
  ASSERT_EQ(docs.size(), 13u);
  for (int i = 0; i < 13; ++i) EXPECT_EQ(docs[i], framed(doc_text(i))) << i;
  EXPECT_NE(src->describe().find("2 file(s) under"), std::string::npos) << src->describe();
}

// Gzip-compressed JSON lines and text read as their decompressed contents; a damaged or
// truncated gzip file is an error naming it.
TEST(Dataset, GzipFilesReadAsTheirContents) {
  test::TempDir dir;
  const std::string root = make_dataset(dir, Kind::Gzip);
  auto src = source(root);
  const auto docs = read_epoch(*src);
  ASSERT_EQ(docs.size(), 13u);
  for (int i = 0; i < 13; ++i) {
    EXPECT_EQ(docs[i], framed(i < 5 ? doc_text(i) : doc_text(i) + "\nsecond line")) << i;
  }
  EXPECT_NE(src->describe().find("2 file(s) under"), std::string::npos) << src->describe();
  // Truncated: the gzip stream stops early.
  const std::string whole = test::read_file(root + "/a.json.gz");
  test::write_file(dir.file("cut.jsonl.gz"), whole.substr(0, whole.size() - 20));
  EXPECT_NE(error_of([&] {
              read_epoch(*source(dir.file("cut.jsonl.gz")));
            }).find("error reading " + dir.file("cut.jsonl.gz")),
            std::string::npos);
  // A .json.gz holding a JSON array is the same mix-up as a plain one.
  test::write_file(dir.file("array.json"), "[{\"text\": \"a\"}]\n");
  gzip_file(dir.file("array.json"));
  EXPECT_NE(error_of([&] { source(dir.file("array.json.gz")); }).find("holds a JSON array"),
            std::string::npos);
  // A resume position beyond a gzip file's decompressed end is an error (the data changed).
  data::TextReader reader({data::TextFile{root + "/a.json.gz", true}}, "text");
  reader.seek(0, 1 << 20);
  data::TextReader::Document doc;
  EXPECT_NE(error_of([&] { reader.next(doc); }).find("cannot be reached (it holds "),
            std::string::npos);
  // Shards are never compressed.
  test::write_file(dir.file("x.bin.gz"), "x");
  EXPECT_NE(error_of([&] { source(dir.file("x.bin.gz")); }).find("is not a supported data file"),
            std::string::npos);
}

// A local copy of allenai/c4: "c4" and "c4_validation" read what torchtitan's
// load_dataset(path, name="en", split=...) reads, en/c4-train.* and en/c4-validation.*, not the
// other variants beside them.
TEST(Dataset, C4FolderReadsTheEnglishSplitAsTorchtitan) {
  test::TempDir dir;
  const std::string c4 = dir.file("c4");
  fs::create_directories(c4 + "/en");
  fs::create_directories(c4 + "/en.noblocklist");
  fs::create_directories(c4 + "/realnewslike");
  write_jsonl(c4 + "/en/c4-train.00000-of-00002.json", 0, 4);
  write_jsonl(c4 + "/en/c4-train.00001-of-00002.json", 4, 3);
  write_jsonl(c4 + "/en/c4-validation.00000-of-00001.json", 100, 2);
  write_jsonl(c4 + "/en.noblocklist/c4-train.00000-of-00001.json", 200, 5);
  write_jsonl(c4 + "/realnewslike/c4-train.00000-of-00001.json", 300, 5);
  for (const auto& e : fs::recursive_directory_iterator(c4)) {
    if (e.is_regular_file()) gzip_file(e.path().string());
  }
  test::write_file(c4 + "/README.md", "---\nconfigs: ...\n");
  auto make = [&](const std::string& name) {
    data::DatasetOptions o;
    o.name = name;
    o.path = c4;
    o.vocab_size = 258;
    return data::make_source(o, kBytes);
  };
  auto train = make("c4");
  const auto docs = read_epoch(*train);
  ASSERT_EQ(docs.size(), 7u);
  for (int i = 0; i < 7; ++i) EXPECT_EQ(docs[i], framed(doc_text(i))) << i;
  EXPECT_NE(train->describe().find("2 file(s) c4-train.* under " + c4 + "/en"), std::string::npos)
      << train->describe();
  const auto validation = read_epoch(*make("c4_validation"));
  ASSERT_EQ(validation.size(), 2u);
  EXPECT_EQ(validation[0], framed(doc_text(100)));
  // Any other name reads the whole folder, as any local dataset.
  EXPECT_EQ(read_epoch(*make("my_c4")).size(), 7u + 2u + 5u + 5u);
  // The en/ folder itself, given as the path, splits the same way.
  data::DatasetOptions o;
  o.name = "c4";
  o.path = c4 + "/en/";
  o.vocab_size = 258;
  EXPECT_EQ(read_epoch(*data::make_source(o, kBytes)).size(), 7u);
}

TEST(Dataset, TextFilesSplitAtEndOfTextLines) {
  test::TempDir dir;
  test::write_file(dir.file("a.txt"),
                   "first doc\nline two\n<|endoftext|>\n\n  \n<|endoftext|>\r\nsecond doc\r\n"
                   "<|endoftext|>\nthird <|endoftext|> stays inside\n");
  auto docs = read_epoch(*source(dir.file("a.txt")));
  ASSERT_EQ(docs.size(), 3u);
  EXPECT_EQ(docs[0], framed("first doc\nline two"));
  EXPECT_EQ(docs[1], framed("second doc"));
  EXPECT_EQ(docs[2], framed("third <|endoftext|> stays inside"));
}

TEST(Dataset, SourcesEndTheEpochAndStartOver) {
  for (Kind kind : {Kind::Jsonl, Kind::Text, Kind::Shards}) {
    test::TempDir dir;
    auto src = source(make_dataset(dir, kind));
    const auto first = read_epoch(*src);
    ASSERT_FALSE(first.empty());
    EXPECT_EQ(src->position().epoch, 1);
    EXPECT_EQ(src->position().doc, 0);
    std::vector<int32_t> again;
    ASSERT_TRUE(src->next(again));
    EXPECT_EQ(again, first.front());
    const auto second = read_epoch(*src);
    EXPECT_EQ(second.size() + 1, first.size());
    EXPECT_EQ(src->position().epoch, 2);
  }
}

TEST(Dataset, RanksReadDisjointPartsThatCoverTheData) {
  for (Kind kind : {Kind::Jsonl, Kind::Text, Kind::Mixed}) {
    test::TempDir dir;
    const std::string root = make_dataset(dir, kind, 17);
    const auto all = read_epoch(*source(root));
    ASSERT_EQ(all.size(), 17u);
    for (int64_t size : {2, 3, 5}) {
      std::multiset<std::vector<int32_t>> seen;
      for (int64_t rank = 0; rank < size; ++rank) {
        const auto mine = read_epoch(*source(root, rank, size));
        // Round-robin: rank r holds documents r, r + size, ...
        for (size_t k = 0; k < mine.size(); ++k) {
          EXPECT_EQ(mine[k], all[rank + k * size]) << "rank " << rank << " of " << size;
        }
        seen.insert(mine.begin(), mine.end());
      }
      EXPECT_EQ(seen, std::multiset<std::vector<int32_t>>(all.begin(), all.end())) << "dp " << size;
    }
  }
}

TEST(Dataset, ShardRanksReadContiguousPartsOfEveryFile) {
  test::TempDir dir;
  fs::create_directories(dir.file("shards"));
  const auto files = write_shards(dir.file("shards"), 3, 7);
  int64_t total = 0;
  for (const auto& f : files) total += static_cast<int64_t>(f.size());
  for (int64_t size : {1, 2, 3}) {
    int64_t read = 0;
    for (int64_t rank = 0; rank < size; ++rank) {
      std::vector<int32_t> expected;
      for (const auto& f : files) {
        const auto n = static_cast<int64_t>(f.size());
        expected.insert(expected.end(), f.begin() + n * rank / size,
                        f.begin() + n * (rank + 1) / size);
      }
      std::vector<int32_t> got;
      for (const auto& d : read_epoch(*source(dir.file("shards"), rank, size))) {
        EXPECT_LE(static_cast<int64_t>(d.size()), data::kShardDocumentTokens);
        got.insert(got.end(), d.begin(), d.end());
      }
      EXPECT_EQ(got, expected) << "rank " << rank << " of " << size;
      read += static_cast<int64_t>(got.size());
    }
    EXPECT_EQ(read, total);
  }
}

TEST(Dataset, LongShardsAreReadInChunks) {
  test::TempDir dir;
  std::vector<int32_t> tokens(20000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i % 258);
  {
    data::ShardWriter w(dir.file("one.bin"), 2, 258);
    w.append(tokens.data(), tokens.size());
    w.finish();
  }
  const auto docs = read_epoch(*source(dir.file("one.bin")));
  ASSERT_EQ(docs.size(), 3u);
  EXPECT_EQ(docs[0].size(), 8192u);
  EXPECT_EQ(docs[2].size(), 20000u - 2 * 8192u);
  EXPECT_EQ(docs[2].back(), tokens.back());
}

TEST(Dataset, ShardWriterAndReaderRoundTrip) {
  test::TempDir dir;
  for (uint32_t width : {2u, 4u}) {
    const int64_t vocab = width == 2 ? 65536 : 200000;
    const std::string path = dir.file("s" + std::to_string(width) + ".bin");
    std::vector<int32_t> tokens = {0, 1, 65535, static_cast<int32_t>(vocab - 1), 7};
    data::ShardWriter w(path, width, vocab);
    w.append(tokens.data(), 2);
    w.append(tokens.data() + 2, 3);
    EXPECT_FALSE(fs::exists(path));  // only the .tmp until finish()
    w.finish();
    const auto h = data::read_shard_header(path);
    EXPECT_EQ(h.tokens, 5);
    EXPECT_EQ(h.token_bytes, width);
    EXPECT_EQ(h.vocab_size, vocab);
    EXPECT_EQ(static_cast<int64_t>(fs::file_size(path)), 32 + 5 * width);
    data::ShardReader r;
    r.open(path);
    std::vector<int32_t> got;
    r.read(1, 4, got);
    EXPECT_EQ(got, std::vector<int32_t>(tokens.begin() + 1, tokens.end()));
  }
  EXPECT_THROW(data::ShardWriter(dir.file("t.bin"), 2, 70000), titan::Error);
}

// DataLoader resume: a new loader over the same files continues exactly where the state says,
// also across epoch ends and with documents split between batches.
class DataLoaderResume : public ::testing::TestWithParam<std::tuple<Kind, int64_t>> {};

TEST_P(DataLoaderResume, ContinuesWithTheSameBatches) {
  const auto [kind, size] = GetParam();
  test::TempDir dir;
  const std::string root = make_dataset(dir, kind, 12);
  // Ranks split by the source (documents / shard ranges) or by the loader (windows).
  for (bool loader_deals : {false, true}) {
    if (loader_deals && size == 1) continue;
    for (int64_t rank = 0; rank < size; ++rank) {
      SCOPED_TRACE("rank " + std::to_string(rank) + " of " + std::to_string(size) +
                   (loader_deals ? ", windows dealt by the loader" : ", split by the source"));
      data::LoaderOptions lo;
      lo.batch_size = 2;
      lo.seq_len = 15;
      lo.prefetch_batches = 2;
      lo.dp_rank = loader_deals ? rank : 0;
      lo.dp_size = loader_deals ? size : 1;
      auto make = [&] { return loader_deals ? source(root) : source(root, rank, size); };
      data::DataLoader original(make(), lo);
      for (int i = 0; i < 7; ++i) ASSERT_TRUE(original.next().defined());
      const std::string saved = original.state().to_json();
      std::vector<at::Tensor> expected;
      for (int i = 0; i < 25; ++i) expected.push_back(original.next());  // crosses epoch ends
      EXPECT_GE(original.state().position.epoch, 1) << "the test should cross an epoch end";

      data::DataLoader resumed(make(), lo);
      resumed.next();  // whatever it read first is dropped by load_state
      resumed.load_state(data::LoaderState::from_json(saved));
      for (int i = 0; i < 25; ++i) {
        at::Tensor b = resumed.next();
        ASSERT_TRUE(b.defined());
        EXPECT_TRUE(at::equal(b, expected[i])) << "batch " << i;
      }
      EXPECT_EQ(resumed.state().to_json(), original.state().to_json());
    }
  }
}

std::string resume_case_name(const ::testing::TestParamInfo<std::tuple<Kind, int64_t>>& info) {
  static const char* const kNames[] = {"Jsonl", "Text", "Shards", "Mixed", "Gzip"};
  return std::string(kNames[static_cast<int>(std::get<0>(info.param))]) + "Dp" +
         std::to_string(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(Dataset, DataLoaderResume,
                         ::testing::Combine(::testing::Values(Kind::Jsonl, Kind::Text, Kind::Shards,
                                                              Kind::Gzip),
                                            ::testing::Values(int64_t{1}, int64_t{2})),
                         resume_case_name);

TEST(Dataset, SourceSeekRestoresMidEpochPositions) {
  for (Kind kind : {Kind::Jsonl, Kind::Text, Kind::Shards, Kind::Gzip}) {
    test::TempDir dir;
    const std::string root = make_dataset(dir, kind, 12);
    auto a = source(root, 1, 2);
    std::vector<int32_t> d;
    ASSERT_TRUE(a->next(d));
    ASSERT_TRUE(a->next(d));
    const auto pos = a->position();
    const auto rest = read_epoch(*a);
    auto b = source(root, 1, 2);
    b->seek(pos);
    EXPECT_EQ(read_epoch(*b), rest);
  }
}

TEST(Dataset, MissingOrEmptyPathsAreErrors) {
  test::TempDir dir;
  EXPECT_NE(error_of([&] {
              source(dir.file("nope"));
            }).find("training.dataset_path: " + dir.file("nope") + " does not exist"),
            std::string::npos);
  fs::create_directories(dir.file("empty"));
  EXPECT_NE(error_of([&] { source(dir.file("empty")); }).find("holds no documents"),
            std::string::npos);
  test::write_file(dir.file("empty/a.jsonl"), "");
  test::write_file(dir.file("empty/b.csv"), "x,y\n");
  EXPECT_NE(error_of([&] {
              source(dir.file("empty"));
            }).find("1 empty data file(s) and 1 file(s) of other types"),
            std::string::npos);
  test::write_file(dir.file("blank.jsonl"), "\n  \n\n");
  auto blank = source(dir.file("blank.jsonl"));
  std::vector<int32_t> d;
  EXPECT_NE(error_of([&] { blank->next(d); }).find("no documents"), std::string::npos);
  test::write_file(dir.file("data.csv"), "a,b\n");
  EXPECT_NE(error_of([&] { source(dir.file("data.csv")); }).find("is not a supported data file"),
            std::string::npos);
  test::write_file(dir.file("array.json"), "  [{\"text\": \"a\"}]\n");
  EXPECT_NE(error_of([&] { source(dir.file("array.json")); }).find("holds a JSON array"),
            std::string::npos);
  fs::create_directories(dir.file("mixed"));
  write_jsonl(dir.file("mixed/a.jsonl"), 0, 2);
  write_shards(dir.file("mixed"), 1, 2);
  EXPECT_NE(error_of([&] { source(dir.file("mixed")); }).find("mixes pre-tokenized shards"),
            std::string::npos);
}

TEST(Dataset, BadJsonlLinesAreLoggedAndSkipped) {
  test::TempDir dir;
  const std::string path = dir.file("d.jsonl");
  test::write_file(path,
                   "{\"text\": \"good one\"}\n{not json\n{\"title\": \"no text\"}\n[1, 2]\n"
                   "{\"text\": 5}\n{\"text\": \"good two\"}\n");
  LogCapture log;
  auto src = source(path);
  const auto docs = read_epoch(*src);
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0], framed("good one"));
  EXPECT_EQ(docs[1], framed("good two"));
  const std::string out = log.text();
  EXPECT_NE(out.find(path + ":2: not valid JSON"), std::string::npos) << out;
  EXPECT_NE(out.find(path + ":3: no field \"text\""), std::string::npos) << out;
  EXPECT_NE(out.find(path + ":4: not a JSON object"), std::string::npos) << out;
  EXPECT_NE(out.find(path + ":5: field \"text\" is not a string"), std::string::npos) << out;
  EXPECT_NE(out.find("skipped 4 invalid JSONL line(s)"), std::string::npos) << out;
}

TEST(Dataset, AllBadJsonlLinesAreAnError) {
  test::TempDir dir;
  const std::string path = dir.file("d.jsonl");
  test::write_file(path, "{\"content\": \"a\"}\n\n{\"content\": \"b\"}\n");
  LogCapture log;
  auto src = source(path);
  std::vector<int32_t> d;
  const std::string e = error_of([&] { src->next(d); });
  EXPECT_NE(e.find("all 2 JSONL lines read are invalid (first: " + path + ":1: no field \"text\")"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("training.dataset_text_field"), std::string::npos);
  // The right field reads fine.
  EXPECT_EQ(read_epoch(*source(path, 0, 1, "content")).size(), 2u);
}

TEST(Dataset, BadShardsNameTheFile) {
  test::TempDir dir;
  auto raw = [&](const std::string& name, const std::string& magic, uint32_t version,
                 uint32_t width, uint64_t count, uint64_t vocab, std::vector<uint16_t> tokens) {
    std::string s = magic;
    s.append(reinterpret_cast<const char*>(&version), 4);
    s.append(reinterpret_cast<const char*>(&width), 4);
    s.append(reinterpret_cast<const char*>(&count), 8);
    s.append(reinterpret_cast<const char*>(&vocab), 8);
    s.append(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
    const std::string path = dir.file(name);
    test::write_file(path, s);
    return path;
  };
  auto first_error = [&](const std::string& path, int64_t vocab = 258) {
    return error_of([&] {
      auto src = source(path, 0, 1, "text", vocab);
      read_epoch(*src);
    });
  };
  const std::vector<uint16_t> ok = {256, 1, 2, 3, 300, 257};
  const auto magic = raw("magic.bin", "NOTTITAN", 1, 2, 6, 258, ok);
  EXPECT_NE(first_error(magic).find("token shard " + magic + ": not a titan token shard"),
            std::string::npos);
  const auto version = raw("version.bin", "TITANTOK", 2, 2, 6, 258, ok);
  EXPECT_NE(first_error(version).find(version + ": format version 2 is not supported"),
            std::string::npos);
  const auto width = raw("width.bin", "TITANTOK", 1, 3, 6, 258, ok);
  EXPECT_NE(first_error(width).find(width + ": bytes per token is 3"), std::string::npos);
  test::write_file(dir.file("short.bin"), "TITANTOK\x01\x00");
  EXPECT_NE(first_error(dir.file("short.bin")).find(dir.file("short.bin") + ": truncated header"),
            std::string::npos);
  const auto truncated = raw("truncated.bin", "TITANTOK", 1, 2, 10, 258, ok);
  EXPECT_NE(first_error(truncated).find("the header says 10 tokens (52 bytes) but the file has 44 "
                                        "bytes (truncated)"),
            std::string::npos);
  const auto big = raw("big.bin", "TITANTOK", 1, 2, 6, 258, ok);
  EXPECT_NE(first_error(big).find("token shard " + big +
                                  ": token id 300 at position 4 is outside the model's "
                                  "vocabulary (vocab_size 258)"),
            std::string::npos);
  const auto wide = raw("wide.bin", "TITANTOK", 1, 2, 6, 50000, ok);
  EXPECT_NE(first_error(wide).find("written with a tokenizer of 50000 ids"), std::string::npos);
}

TEST(Dataset, StateOfOtherDataIsRejected) {
  test::TempDir dir;
  const std::string root = make_dataset(dir, Kind::Jsonl);
  auto src = source(root);
  data::SourcePosition pos;
  pos.file = 1;
  pos.offset = 1 << 20;
  EXPECT_NE(error_of([&] { src->seek(pos); }).find("is beyond the end of"), std::string::npos);
  pos.file = 7;
  pos.offset = 0;
  EXPECT_THROW(src->seek(pos), titan::Error);
}

TEST(Dataset, TextReaderReportsLinesAndResumes) {
  test::TempDir dir;
  write_jsonl(dir.file("a.jsonl"), 0, 12);
  data::TextReader reader({data::TextFile{dir.file("a.jsonl"), true}}, "text");
  data::TextReader::Document doc;
  std::string problem;
  std::vector<int64_t> lines;
  int64_t file = 0, offset = 0;
  for (int i = 0; i < 12; ++i) {
    ASSERT_TRUE(reader.next(doc));
    lines.push_back(doc.line);
    ASSERT_TRUE(reader.extract(doc, problem)) << problem;
    EXPECT_EQ(doc.text, doc_text(i));
    if (i == 6) {
      file = reader.file();
      offset = reader.offset();
    }
  }
  EXPECT_FALSE(reader.next(doc));
  // Line numbers count the blank lines after documents 0, 5 and 10.
  EXPECT_EQ(lines[0], 1);
  EXPECT_EQ(lines[1], 3);
  EXPECT_EQ(lines[6], 9);
  reader.seek(file, offset);
  ASSERT_TRUE(reader.next(doc));
  EXPECT_EQ(doc.line, lines[7]);
  ASSERT_TRUE(reader.extract(doc, problem));
  EXPECT_EQ(doc.text, doc_text(7));
}
