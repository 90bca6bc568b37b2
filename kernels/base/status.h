// Status and Result<T>: how fallible operations report errors inside rally.
//
// Every layer below the public training API returns a Status (or a Result<T> holding a value or a
// Status) and propagates it with RALLY_RETURN_IF_ERROR, adding context as it goes:
//
//   rally::Status loadManifest(const std::string& path) {
//     RALLY_RETURN_IF_ERROR(readFile(path, &bytes)) << "while loading manifest " << path;
//     RALLY_ASSIGN_OR_RETURN(Manifest m, parseManifest(bytes));
//     ...
//   }
//
// Codes name the origin of the failure (c10d's DistBackendError / DistStoreError /
// DistNetworkError), so a caller can decide what to do: retry on kUnavailable, recover on kPeerLost
// / kAborted, report kInvalidArgument to the user.
//
// Thread-safety: Status and Result are values; distinct objects may be used from distinct threads.
#pragma once

#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace rally {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,     // the caller's input is wrong; retrying will not help
  kNotFound,            // a named thing does not exist
  kAlreadyExists,       // a named thing exists and must not
  kFailedPrecondition,  // the system is not in the state the operation needs
  kResourceExhausted,   // a configured limit was reached; the message names it
  kUnauthenticated,     // missing or wrong job token
  kTimeout,             // a deadline passed
  kPeerLost,            // another rank or node of the job died or became unreachable
  kAborted,             // the operation was cancelled: abort() or a generation change
  kUnavailable,         // a service is not reachable right now; safe operations may retry
  kIo,                  // the operating system refused (files, sockets, processes)
  kUnimplemented,       // this backend or build cannot do it; the message says what can
  kInternal,            // a bug in rally
};

std::string_view statusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // "Timeout: waiting for keys [a, b]: while bootstrapping gloo"
  std::string toString() const;

  // Appends context, outermost last: "inner cause: while doing X".
  Status& addContext(std::string_view context);

  friend bool operator==(const Status& a, const Status& b) {
    return a.code_ == b.code_ && a.message_ == b.message_;
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status okStatus() { return Status(); }
Status invalidArgument(std::string message);
Status notFound(std::string message);
Status alreadyExists(std::string message);
Status failedPrecondition(std::string message);
Status resourceExhausted(std::string message);
Status unauthenticated(std::string message);
Status timeoutError(std::string message);
Status peerLost(std::string message);
Status aborted(std::string message);
Status unavailable(std::string message);
Status ioError(std::string message);
Status internalError(std::string message);
Status unimplemented(std::string message);
// An Io status from errno: "open(/x): No such file or directory".
Status errnoStatus(std::string_view what, int err);

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : data_(std::move(value)) {}        // NOLINT(google-explicit-constructor)
  Result(Status status) : data_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    if (std::get<Status>(data_).ok()) {
      data_ = Status(StatusCode::kInternal, "Result constructed from an OK status without a value");
    }
  }

  bool ok() const { return std::holds_alternative<T>(data_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(data_);
  }
  T& value() & { return std::get<T>(data_); }
  const T& value() const& { return std::get<T>(data_); }
  T&& value() && { return std::get<T>(std::move(data_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> data_;
};

namespace internal {

// Collects context streamed after RALLY_RETURN_IF_ERROR and converts to Status or Result<T>.
class StatusBuilder {
 public:
  explicit StatusBuilder(Status status) : status_(std::move(status)) {}
  template <typename T>
  StatusBuilder& operator<<(const T& value) {
    context_ << value;
    return *this;
  }
  operator Status() const {  // NOLINT(google-explicit-constructor)
    Status s = status_;
    const std::string context = context_.str();
    if (!context.empty()) s.addContext(context);
    return s;
  }
  template <typename T>
  operator Result<T>() const {  // NOLINT(google-explicit-constructor)
    return Result<T>(static_cast<Status>(*this));
  }

 private:
  Status status_;
  std::ostringstream context_;
};

inline Status toStatus(Status s) { return s; }
template <typename T>
Status toStatus(const Result<T>& r) {
  return r.status();
}

}  // namespace internal
}  // namespace rally

#define RALLY_STATUS_CONCAT_INNER(a, b) a##b
#define RALLY_STATUS_CONCAT(a, b) RALLY_STATUS_CONCAT_INNER(a, b)

// Returns the status of `expr` from the enclosing function if it is not OK; context may be
// streamed:
//   RALLY_RETURN_IF_ERROR(f()) << "while doing " << x;
#define RALLY_RETURN_IF_ERROR(expr)                                                            \
  if (::rally::Status rally_status_ = ::rally::internal::toStatus(expr); rally_status_.ok()) { \
  } else                                                                                       \
    return ::rally::internal::StatusBuilder(std::move(rally_status_))

#define RALLY_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()

// Declares or assigns `lhs` from a Result, returning its status from the enclosing function on
// error.
#define RALLY_ASSIGN_OR_RETURN(lhs, expr) \
  RALLY_ASSIGN_OR_RETURN_IMPL(RALLY_STATUS_CONCAT(rally_result_, __LINE__), lhs, expr)
