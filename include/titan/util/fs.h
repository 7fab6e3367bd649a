// File-system helpers on plain POSIX calls. pip builds of LibTorch export their own copies of
// some std::filesystem functions (built with another toolchain), and calls that resolve to
// them have crashed (remove_all); titan's file handling therefore does not depend on
// std::filesystem's compiled parts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace titan::util {

bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
bool is_regular_file(const std::string& path);
int64_t file_size(const std::string& path);  // -1 when missing
// mkdir -p; throws titan::Error naming the path on failure.
void make_directories(const std::string& path);
// For a message about a missing `path`: " (relative to the working directory <cwd>)" when it
// is relative, else "".
std::string relative_note(const std::string& path);
// make_directories, then a probe file created and removed in it: a folder a run will write
// into later is checked at start-up. Throws titan::Error naming `key` (the config key it comes
// from), the path and the reason.
void ensure_writable_directory(const std::string& path, const std::string& key);
// rm -rf; a missing path is fine. Throws titan::Error on failure.
void remove_tree(const std::string& path);
// rename(2) (atomic within one file system); throws titan::Error naming both paths.
void rename_path(const std::string& from, const std::string& to);
// Writes `text` to `path` through a temporary file in the same folder, flushed to disk and
// renamed over `path`: readers see the old or the new file, never part of one. The folder is
// created if needed. Throws titan::Error naming the path (and the errno text) on failure.
void write_file_atomically(const std::string& path, const std::string& text);
// Names in a directory (not "." or ".."), sorted.
std::vector<std::string> list_directory(const std::string& path);
// "a/b" from ("a", "b"), without doubling the separator.
std::string join_path(const std::string& a, const std::string& b);
std::string parent_path(const std::string& path);

// An exclusive lock on a folder for as long as the object lives: flock(2) on
// <folder>/.titan.lock, released by the kernel when the process ends however it ends. The lock
// file names its holder (host, pid, start time). Creates the folder. Throws titan::Error naming
// the holder when another process holds the lock.
class FolderLock {
 public:
  // `user`: what uses the folder, for the message ("job.dump_folder").
  FolderLock(const std::string& folder, const std::string& user);
  ~FolderLock();
  FolderLock(const FolderLock&) = delete;
  FolderLock& operator=(const FolderLock&) = delete;

 private:
  int fd_ = -1;
};

// A path as a string, from std::string, const char* or a std::filesystem::path-like object.
inline std::string path_str(const std::string& s) {
  return s;
}
inline std::string path_str(const char* s) {
  return s;
}
template <typename P>
auto path_str(const P& p) -> decltype(p.string()) {
  return p.string();
}

}  // namespace titan::util
