// Listing data files, and reading text/JSONL documents in order from a byte position.
#include "titan/data/text_reader.h"
#include "titan/util/fs.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>

#include "io.h"
#include "titan/util/error.h"
#include "titan/util/strings.h"

namespace titan::data {
namespace {

namespace fs = std::filesystem;

constexpr std::string_view kSeparator = "<|endoftext|>";

enum class Kind { Text, Jsonl, Shard, Other };

bool gzipped(const fs::path& p) {
  return util::lower(p.extension().string()) == ".gz";
}

// By extension; text and JSON lines may be gzip-compressed (c4's .json.gz).
Kind kind_of(const fs::path& p) {
  const bool gz = gzipped(p);
  const std::string ext = util::lower((gz ? p.stem() : p).extension().string());
  if (ext == ".txt") return Kind::Text;
  if (ext == ".jsonl" || ext == ".json") return Kind::Jsonl;
  if (ext == ".bin" && !gz) return Kind::Shard;
  return Kind::Other;
}

bool hidden(const fs::path& p) {
  const std::string name = p.filename().string();
  return !name.empty() && name[0] == '.';
}

// A .json file holding one JSON array instead of JSON lines is a common mix-up.
void check_not_json_array(const std::string& path) {
  const std::string start = io::head(path, 4096);
  const size_t first = start.find_first_not_of(" \t\r\n\f\v");
  TITAN_CHECK(first == std::string::npos || start[first] != '[', "dataset file ", path,
              " holds a JSON array; titan reads JSON lines (one object per line)");
}

std::string_view strip_line_break(std::string_view line) {
  if (!line.empty() && line.back() == '\n') line.remove_suffix(1);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  return line;
}

bool is_blank(std::string_view s) {
  return s.find_first_not_of(" \t\r\n\f\v") == std::string_view::npos;
}

}  // namespace

DataFiles list_data_files(const std::string& path, const std::string& name_prefix) {
  const fs::path root(path);
  std::error_code ec;
  TITAN_CHECK(util::path_exists(util::path_str(root)), "dataset path ", path, " does not exist");
  std::vector<fs::path> candidates;
  const bool folder = util::is_directory(util::path_str(root));
  if (folder) {
    for (auto it = fs::recursive_directory_iterator(root, ec); !ec && it != fs::end(it);
         it.increment(ec)) {
      if (hidden(it->path())) {
        if (it->is_directory()) it.disable_recursion_pending();
        continue;
      }
      if (it->is_regular_file() && it->path().filename().string().rfind(name_prefix, 0) == 0) {
        candidates.push_back(it->path());
      }
    }
    TITAN_CHECK(!ec, "dataset path ", path, ": cannot list it (", ec.message(), ")");
  } else {
    TITAN_CHECK(kind_of(root) != Kind::Other, "dataset path ", path,
                " is not a supported data file (expected .txt, .jsonl, .json (each may be "
                ".gz) or .bin, or a folder of them)");
    candidates.push_back(root);
  }
  std::sort(candidates.begin(), candidates.end());

  DataFiles out;
  int64_t ignored = 0, empty = 0;
  for (const auto& p : candidates) {
    const Kind k = kind_of(p);
    if (k == Kind::Other) {
      ++ignored;
      continue;
    }
    const auto size = util::file_size(util::path_str(p));
    if (!ec && size == 0) {
      ++empty;
      continue;
    }
    if (k == Kind::Shard) {
      out.shards.push_back(p.string());
    } else {
      if (k == Kind::Jsonl) check_not_json_array(p.string());
      out.text.push_back(TextFile{p.string(), k == Kind::Jsonl});
    }
  }
  if (out.shards.empty() && out.text.empty()) {
    fail("dataset path ", path, " holds no documents: ",
         candidates.empty()
             ? std::string(folder ? "the folder has no files" : "no files")
             : std::to_string(empty) + " empty data file(s) and " + std::to_string(ignored) +
                   " file(s) of other types (read: .txt, .jsonl, .json, each may be .gz, and "
                   ".bin)");
  }
  return out;
}

struct TextReader::Impl {
  io::LineReader reader;
  std::string line;
  int64_t lines_read = 0;  // in the open file
};

TextReader::TextReader(std::vector<TextFile> files, std::string text_field)
    : files_(std::move(files)), field_(std::move(text_field)), impl_(std::make_unique<Impl>()) {
  if (field_.empty()) field_ = "text";
}

TextReader::~TextReader() = default;

int64_t TextReader::offset() const {
  return impl_->reader.is_open() ? impl_->reader.offset() : offset_;
}

void TextReader::seek(int64_t file, int64_t offset) {
  TITAN_CHECK(file >= 0 && file <= static_cast<int64_t>(files_.size()) && offset >= 0,
              "text reader position (file ", file, ", offset ", offset, ") is outside the ",
              files_.size(), " files");
  if (file < static_cast<int64_t>(files_.size()) &&
      !gzipped(files_[static_cast<size_t>(file)].path)) {
    // (A gzip file's decompressed size is known only by reading it: opening it at the offset
    // checks.)
    const auto& path = files_[static_cast<size_t>(file)].path;
    const auto size = util::file_size(util::path_str(path));
    TITAN_CHECK(size >= 0 && offset <= size, "resume position: byte offset ", offset,
                " is beyond the end of ", path, " (", size,
                " bytes); the dataset changed since the position was saved");
  }
  impl_->reader.close();
  file_ = file;
  offset_ = offset;
}

bool TextReader::next(Document& doc) {
  Impl& m = *impl_;
  while (file_ < static_cast<int64_t>(files_.size())) {
    const TextFile& f = files_[static_cast<size_t>(file_)];
    if (!m.reader.is_open()) {
      m.reader.open(f.path, offset_);
      m.lines_read = m.reader.lines_before();
    }
    doc.file = file_;
    doc.jsonl = f.jsonl;
    doc.text.clear();
    if (f.jsonl) {
      while (m.reader.next_line(m.line)) {
        ++m.lines_read;
        const std::string_view line = strip_line_break(m.line);
        if (is_blank(line)) continue;
        doc.text.assign(line);
        doc.line = m.lines_read;
        return true;
      }
    } else {
      doc.line = m.lines_read + 1;
      while (m.reader.next_line(m.line)) {
        ++m.lines_read;
        if (strip_line_break(m.line) == kSeparator) {
          if (!is_blank(doc.text)) break;
          doc.text.clear();  // a blank document: skipped
          doc.line = m.lines_read + 1;
          continue;
        }
        doc.text += m.line;
      }
      if (!is_blank(doc.text)) {
        // The line break that ends the document's last line belongs to the separator.
        if (doc.text.back() == '\n') doc.text.pop_back();
        if (!doc.text.empty() && doc.text.back() == '\r') doc.text.pop_back();
        return true;
      }
    }
    m.reader.close();
    ++file_;
    offset_ = 0;
  }
  return false;
}

bool TextReader::extract(Document& doc, std::string& problem) const {
  if (!doc.jsonl) return true;
  const std::string where =
      files_[static_cast<size_t>(doc.file)].path + ":" + std::to_string(doc.line) + ": ";
  try {
    auto j = nlohmann::json::parse(doc.text);
    if (!j.is_object()) {
      problem = where + "not a JSON object";
    } else if (!j.contains(field_)) {
      problem = where + "no field \"" + field_ + "\"";
    } else if (!j[field_].is_string()) {
      problem = where + "field \"" + field_ + "\" is not a string";
    } else {
      doc.text = j[field_].get<std::string>();
      return true;
    }
  } catch (const nlohmann::json::exception& e) {
    problem = where + "not valid JSON (" + util::json_error_text(e.what()) + ")";
  }
  return false;
}

}  // namespace titan::data
