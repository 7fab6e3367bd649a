// POSIX file-system helpers.
#include "titan/util/fs.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>

#include "titan/util/error.h"

namespace titan::util {

bool path_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_regular_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

int64_t file_size(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return -1;
  return static_cast<int64_t>(st.st_size);
}

void make_directories(const std::string& path) {
  if (path.empty() || is_directory(path)) return;
  std::string partial;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    partial = path.substr(0, pos);
    if (partial.empty() || is_directory(partial)) continue;
    if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
      fail("cannot create directory ", partial, ": ", std::strerror(errno));
    }
  }
}

namespace {
int remove_entry(const char* p, const struct stat*, int, struct FTW*) {
  return ::remove(p);
}
}  // namespace

void remove_tree(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  if (!S_ISDIR(st.st_mode)) {
    TITAN_CHECK(::unlink(path.c_str()) == 0, "cannot remove ", path, ": ", std::strerror(errno));
    return;
  }
  TITAN_CHECK(::nftw(path.c_str(), remove_entry, 32, FTW_DEPTH | FTW_PHYS) == 0, "cannot remove ",
              path, ": ", std::strerror(errno));
}

void rename_path(const std::string& from, const std::string& to) {
  TITAN_CHECK(::rename(from.c_str(), to.c_str()) == 0, "cannot rename ", from, " to ", to, ": ",
              std::strerror(errno));
}

void write_file_atomically(const std::string& path, const std::string& text) {
  const std::string dir = parent_path(path);
  if (!dir.empty()) make_directories(dir);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TITAN_CHECK(fd >= 0, "cannot write ", tmp, ": ", std::strerror(errno));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      fail("cannot write ", path, ": ", std::strerror(err));
    }
    done += static_cast<size_t>(n);
  }
  const bool synced = ::fsync(fd) == 0;
  const int err = errno;
  ::close(fd);
  if (!synced) {
    ::unlink(tmp.c_str());
    fail("cannot write ", path, ": ", std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    fail("cannot rename ", tmp, " to ", path, ": ", std::strerror(e));
  }
}

std::vector<std::string> list_directory(const std::string& path) {
  std::vector<std::string> out;
  DIR* d = ::opendir(path.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") out.push_back(name);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

std::string join_path(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (a.back() == '/') return a + b;
  return a + "/" + b;
}

std::string parent_path(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string relative_note(const std::string& path) {
  if (path.empty() || path[0] == '/') return "";
  std::error_code ec;
  const auto cwd = std::filesystem::current_path(ec);
  return ec ? "" : " (relative to the working directory " + cwd.string() + ")";
}

void ensure_writable_directory(const std::string& path, const std::string& key) {
  try {
    make_directories(path);
  } catch (const Error& e) {
    fail(key, ": ", e.what());
  }
  TITAN_CHECK(is_directory(path), key, ": ", path, " is not a folder");
  const std::string probe = join_path(path, ".titan_write_probe." + std::to_string(::getpid()));
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  TITAN_CHECK(fd >= 0, key, ": cannot write into ", path, ": ", std::strerror(errno));
  ::close(fd);
  ::unlink(probe.c_str());
}

FolderLock::FolderLock(const std::string& folder, const std::string& user) {
  make_directories(folder);
  const std::string path = join_path(folder, ".titan.lock");
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  TITAN_CHECK(fd_ >= 0, user, ": cannot create the lock file ", path, ": ", std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[512] = {0};
    const ssize_t n = ::pread(fd_, buf, sizeof(buf) - 1, 0);
    std::string holder = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "another process";
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    ::close(fd_);
    fd_ = -1;
    TITAN_CHECK(err != EWOULDBLOCK, user, " ", folder, " is in use by another titan run (", holder,
                "); wait for it to finish, stop it, or choose another folder");
    fail(user, ": cannot lock ", path, ": ", std::strerror(err));
  }
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  char when[64] = {0};
  const time_t now = ::time(nullptr);
  struct tm tm {};
  ::localtime_r(&now, &tm);
  ::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", &tm);
  const std::string owner = "host " + std::string(host) + ", pid " + std::to_string(::getpid()) +
                            ", started " + when + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, owner.data(), owner.size(), 0) < 0) {
    // The lock holds without the description; a second run then names no holder.
  }
}

FolderLock::~FolderLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the last descriptor releases the flock
}

}  // namespace titan::util
