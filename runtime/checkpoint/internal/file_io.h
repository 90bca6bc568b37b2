// The few syscalls checkpoints make, each retried on EINTR and reporting the path and errno
// (ENOSPC becomes ResourceExhausted, so a full disk is told apart from other I/O errors).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "kernels/base/status.h"

namespace rally::checkpoint::internal {

// An owned file descriptor.
class File {
 public:
  File() = default;
  explicit File(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  File(File&& o) noexcept : fd_(o.fd_), path_(std::move(o.path_)) { o.fd_ = -1; }
  File& operator=(File&& o) noexcept;
  ~File();
  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  Status close();

 private:
  int fd_ = -1;
  std::string path_;
};

Result<File> openFile(const std::string& path, int flags, mode_t mode = 0644);
Status writeAt(const File& f, const void* data, size_t bytes, std::uint64_t offset);
// Reads exactly `bytes`; a short file is an Io error naming the path and the range.
Status readAt(const File& f, void* data, size_t bytes, std::uint64_t offset);
Status syncData(const File& f);
Result<std::uint64_t> fileSize(const File& f);
// fsync() of a directory, so that entries created or renamed in it are durable.
Status syncDirectory(const std::string& dir);
// Writes `content` to `path` atomically and durably: a temporary name beside it, fsync, rename,
// fsync of the directory.
Status writeFileAtomically(const std::string& path, const std::string& content);
Result<std::string> readWholeFile(const std::string& path);
// ENOSPC and EDQUOT as ResourceExhausted ("disk full"), anything else as Io.
Status fileError(std::string_view what, const std::string& path, int err);

}  // namespace rally::checkpoint::internal
