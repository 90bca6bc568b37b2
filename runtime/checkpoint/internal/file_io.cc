#include "runtime/checkpoint/internal/file_io.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

namespace rally::checkpoint::internal {

Status fileError(std::string_view what, const std::string& path, int err) {
  if (err == ENOSPC || err == EDQUOT) {
    return resourceExhausted(
        fmt::format("{}({}): {} (the disk or quota is full)", what, path, std::strerror(err)));
  }
  return ioError(fmt::format("{}({}): {}", what, path, std::strerror(err)));
}

File& File::operator=(File&& o) noexcept {
  if (this != &o) {
    (void)close();
    fd_ = std::exchange(o.fd_, -1);
    path_ = std::move(o.path_);
  }
  return *this;
}

File::~File() { (void)close(); }

Status File::close() {
  if (fd_ < 0) return okStatus();
  const int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0 && errno != EINTR) return fileError("close", path_, errno);
  return okStatus();
}

Result<File> openFile(const std::string& path, int flags, mode_t mode) {
  int fd;
  do {
    fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return fileError("open", path, errno);
  return File(fd, path);
}

Status writeAt(const File& f, const void* data, size_t bytes, std::uint64_t offset) {
  const auto* p = static_cast<const unsigned char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::pwrite(f.fd(), p, bytes, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fileError("write", f.path(), errno);
    }
    if (n == 0) return fileError("write", f.path(), ENOSPC);
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<std::uint64_t>(n);
  }
  return okStatus();
}

Status readAt(const File& f, void* data, size_t bytes, std::uint64_t offset) {
  auto* p = static_cast<unsigned char*>(data);
  const std::uint64_t start = offset, end = offset + bytes;
  while (bytes > 0) {
    const ssize_t n = ::pread(f.fd(), p, bytes, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fileError("read", f.path(), errno);
    }
    if (n == 0) {
      return ioError(
          fmt::format("{} ends at byte {}, but bytes [{}, {}) were to be read: the file "
                      "is truncated",
                      f.path(), offset, start, end));
    }
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<std::uint64_t>(n);
  }
  return okStatus();
}

Status syncData(const File& f) {
  int rc;
  do {
    rc = ::fdatasync(f.fd());
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) return fileError("fdatasync", f.path(), errno);
  return okStatus();
}

Result<std::uint64_t> fileSize(const File& f) {
  struct stat st {};
  if (::fstat(f.fd(), &st) != 0) return fileError("fstat", f.path(), errno);
  return static_cast<std::uint64_t>(st.st_size);
}

Status syncDirectory(const std::string& dir) {
  RALLY_ASSIGN_OR_RETURN(File d, openFile(dir, O_RDONLY | O_DIRECTORY));
  int rc;
  do {
    rc = ::fsync(d.fd());
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) return fileError("fsync", dir, errno);
  return okStatus();
}

Status writeFileAtomically(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp";
  {
    RALLY_ASSIGN_OR_RETURN(File f, openFile(tmp, O_WRONLY | O_CREAT | O_TRUNC));
    Status st = writeAt(f, content.data(), content.size(), 0);
    if (st.ok()) st = syncData(f);
    if (st.ok()) st = f.close();
    if (!st.ok()) {
      ::unlink(tmp.c_str());
      return st;
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return fileError("rename", tmp + " -> " + path, err);
  }
  return syncDirectory(std::filesystem::path(path).parent_path().string());
}

Result<std::string> readWholeFile(const std::string& path) {
  RALLY_ASSIGN_OR_RETURN(File f, openFile(path, O_RDONLY));
  RALLY_ASSIGN_OR_RETURN(const std::uint64_t size, fileSize(f));
  std::string out(size, '\0');
  RALLY_RETURN_IF_ERROR(readAt(f, out.data(), out.size(), 0));
  return out;
}

}  // namespace rally::checkpoint::internal
