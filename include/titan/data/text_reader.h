// Reads raw documents, in order, from plain-text and JSON-lines files (formats: dataset.h),
// with a resumable (file, byte offset) position. Shared by the training data sources and the
// titan_tokenize tool.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace titan::data {

struct TextFile {
  std::string path;
  bool jsonl = false;  // JSON lines, else plain text
};

// The data files under `path` (a file, or a folder listed recursively in sorted order,
// skipping hidden names, and in a folder only names starting with `name_prefix`): text/JSONL
// files, also gzip-compressed (.txt.gz, .jsonl.gz, .json.gz), and pre-tokenized shards (.bin).
// Empty files and other extensions are left out. Throws titan::Error for a missing path, an
// unsupported single file, a .json file holding a JSON array, or when no data file is left.
struct DataFiles {
  std::vector<TextFile> text;
  std::vector<std::string> shards;
};
DataFiles list_data_files(const std::string& path, const std::string& name_prefix = "");

class TextReader {
 public:
  // A document as read: for JSONL, the raw line until extract() replaces it by its field.
  struct Document {
    std::string text;
    int64_t file = 0;  // index into the file list
    int64_t line = 0;  // 1-based line where it starts
    bool jsonl = false;
  };

  TextReader(std::vector<TextFile> files, std::string text_field);
  ~TextReader();
  TextReader(const TextReader&) = delete;
  TextReader& operator=(const TextReader&) = delete;

  // Next non-blank document; false at the end of the last file.
  bool next(Document& doc);
  // Replaces a JSONL document's line by its text field. False when the line is not a JSON
  // object with a string field; `problem` then says why ("file:line: ...").
  bool extract(Document& doc, std::string& problem) const;

  // Position of the next unread document: file index and byte offset in it.
  int64_t file() const { return file_; }
  int64_t offset() const;
  // Continues at (file, offset), which must be a position this reader reported.
  void seek(int64_t file, int64_t offset);

  const std::vector<TextFile>& files() const { return files_; }
  const std::string& text_field() const { return field_; }

 private:
  struct Impl;
  std::vector<TextFile> files_;
  std::string field_;
  int64_t file_ = 0;
  int64_t offset_ = 0;  // used while no file is open
  std::unique_ptr<Impl> impl_;
};

}  // namespace titan::data
