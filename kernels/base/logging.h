// Logging through spdlog: leveled, every line prefixed with who is speaking ("coordinator",
// "node 2", "node 2 rank 5") and the subsystem, filterable per subsystem.
//
//   rally::log::setup("coordinator", "info,rendezvous=debug");   // once, in main()
//   auto log = rally::log::get("rendezvous");
//   log->info("round {} formed with {} nodes", generation, n);
//
// Thread-safety: setup() must run before other threads log; get() and the loggers are thread-safe.
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string_view>

#include "kernels/base/status.h"

namespace rally::log {

// Sets the prefix on every line and the levels. `level_spec` is "LEVEL[,SUBSYSTEM=LEVEL...]" with
// levels trace, debug, info, warn, error, off.
Status setup(std::string_view prefix, std::string_view level_spec);

// The logger of one subsystem (created on first use with the configured prefix and level).
std::shared_ptr<spdlog::logger> get(std::string_view subsystem);

// Makes std::terminate (an uncaught exception, "pure virtual method called") write what happened
// and the calling thread's backtrace to stderr before it aborts, so that a rare crash can be
// diagnosed from a log alone (addr2line -e BINARY OFFSET for frames without a name). Call once,
// first thing in main().
void installCrashReport(std::string_view program);

}  // namespace rally::log
