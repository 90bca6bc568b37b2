#include "launcher/cli/checkpoint_command.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <iostream>
#include <memory>

#include "kernels/base/units.h"
#include "runtime/checkpoint/checkpointer.h"
#include "runtime/checkpoint/manifest.h"

namespace rally::cli {
namespace {

namespace fs = std::filesystem;
using checkpoint::CheckpointEntry;
using checkpoint::Manifest;

struct Args {
  std::string path;
  std::int64_t step = -1;
  bool shards = false;
  bool json = false;
};

std::string size(std::uint64_t b) {
  const std::string s = formatBytes(static_cast<std::int64_t>(b));
  return s.find_first_not_of("0123456789") == std::string::npos ? s + " B" : s;
}

bool isCheckpoint(const std::string& path) {
  return fs::exists(fs::path(path) / checkpoint::kManifestName) ||
         fs::path(path).filename().string().rfind("step-", 0) == 0;
}

// The checkpoint directories PATH names: itself, --step of it, or (all=false) its newest complete.
std::vector<std::string> targets(const Args& a, bool all, std::string* error) {
  if (!fs::is_directory(a.path)) {
    *error = fmt::format(
        "{} is not a directory (expected a checkpoint directory or the directory "
        "that holds them)",
        a.path);
    return {};
  }
  if (isCheckpoint(a.path)) {
    if (a.step >= 0) *error = "--step applies to a directory that holds checkpoints, not to one";
    return {a.path};
  }
  if (a.step >= 0) {
    const std::string p =
        (fs::path(a.path) / checkpoint::stepDirectoryName(static_cast<std::uint64_t>(a.step)))
            .string();
    if (!fs::is_directory(p))
      *error = fmt::format("{} has no checkpoint of step {}", a.path, a.step);
    return {p};
  }
  std::vector<std::string> out;
  for (const CheckpointEntry& e : checkpoint::listCheckpoints(a.path)) {
    if (all || e.complete) out.push_back(e.path);
    if (!all && e.complete) break;
  }
  if (out.empty()) *error = fmt::format("{} holds no {}checkpoint", a.path, all ? "" : "complete ");
  return out;
}

int list(const Args& a) {
  if (!fs::is_directory(a.path)) {
    std::cerr << "rally checkpoint ls: " << a.path << " is not a directory\n";
    return 2;
  }
  const auto entries = checkpoint::listCheckpoints(a.path);
  if (entries.empty()) {
    std::cout << "no checkpoints in " << a.path << "\n";
    return 0;
  }
  std::cout << fmt::format("{:>12}  {:<12} {:>10} {:>5} {:>5}  {:<20}  {}\n", "step", "status",
                           "size", "files", "world", "created", "layout");
  int problems = 0;
  for (const CheckpointEntry& e : entries) {
    auto m = checkpoint::readManifest(e.path);
    if (!m.ok()) {
      ++problems;
      std::cout << fmt::format("{:>12}  {:<12} {}\n", e.step,
                               e.complete ? "unreadable" : "incomplete",
                               e.complete ? m.status().message() : "no manifest");
      continue;
    }
    std::cout << fmt::format("{:>12}  {:<12} {:>10} {:>5} {:>5}  {:<20}  {}\n", e.step, "complete",
                             size(m->totalBytes()), m->files.size(), m->world_size, m->created,
                             m->layout.empty() ? "-" : m->layout);
  }
  for (const auto& de : fs::directory_iterator(a.path)) {
    const std::string name = de.path().filename().string();
    if (name.rfind(".partial-", 0) == 0) {
      std::cout << "(being saved, or interrupted: " << name << ")\n";
    } else if (name.rfind(".corrupt-", 0) == 0) {
      std::cout << "(moved aside by a load that found it damaged: " << name << ")\n";
    }
  }
  return problems > 0 ? 1 : 0;
}

int inspect(const Args& a) {
  std::string error;
  const auto paths = targets(a, false, &error);
  if (!error.empty()) {
    std::cerr << "rally checkpoint inspect: " << error << "\n";
    return 2;
  }
  auto m = checkpoint::readManifest(paths[0]);
  if (!m.ok()) {
    std::cerr << "rally checkpoint inspect: " << m.status().message() << "\n";
    return 1;
  }
  if (a.json) {
    std::cout << checkpoint::toJson(*m);
    return 0;
  }
  std::cout << fmt::format(
      "{}\n  step {}, commit {}, created {}\n  saved by {} ranks{}\n  {} in {} tensors, {} "
      "files; checksums xxh3-64 per {} block\n",
      paths[0], m->step, m->commit, m->created, m->world_size,
      m->layout.empty() ? "" : " (" + m->layout + ")", size(m->totalBytes()), m->tensors.size(),
      m->files.size(), size(m->block_bytes));
  if (!m->scalars.empty()) std::cout << "scalars:\n";
  for (const auto& [name, s] : m->scalars) {
    std::cout << fmt::format(
        "  {} = {}\n", name,
        s.is_double ? fmt::format("{}", s.asDouble()) : std::to_string(s.bits));
  }
  std::cout << "tensors:\n";
  for (const auto& t : m->tensors) {
    std::uint64_t bytes = 0;
    for (const auto& s : t.shards) bytes += s.bytes;
    std::cout << fmt::format("  {} {} [{}] {} in {} shards\n", t.name,
                             collectives::dataTypeName(t.type), fmt::join(t.shape, ", "),
                             size(bytes), t.shards.size());
    if (!a.shards) continue;
    for (const auto& s : t.shards) {
      std::cout << fmt::format("    {} from rank {}: {} bytes [{}, {}) checksum {}\n",
                               checkpoint::describe(s.box), s.rank, s.file, s.offset,
                               s.offset + s.bytes, checkpoint::checksumHex(s.checksum));
    }
  }
  return 0;
}

int verify(const Args& a) {
  std::string error;
  const auto paths = targets(a, true, &error);
  if (!error.empty()) {
    std::cerr << "rally checkpoint verify: " << error << "\n";
    return 2;
  }
  int bad = 0;
  for (const std::string& p : paths) {
    auto report = checkpoint::verifyCheckpoint(p);
    if (!report.ok()) {
      ++bad;
      std::cout << "BAD " << p << ": " << report.status().message() << "\n";
      continue;
    }
    if (report->problems.empty()) {
      std::cout << "OK  " << p << " (" << size(report->bytes_checked) << " checked)\n";
      continue;
    }
    ++bad;
    std::cout << "BAD " << p << ": " << report->problems.size() << " problem(s)\n";
    for (const std::string& problem : report->problems) std::cout << "    " << problem << "\n";
  }
  if (paths.size() > 1) {
    std::cout << fmt::format("{} of {} checkpoints verified", paths.size() - bad, paths.size())
              << "\n";
  }
  return bad > 0 ? 1 : 0;
}

}  // namespace

void addCheckpointCommand(CLI::App& app, std::function<int()>* run) {
  auto* cmd = app.add_subcommand(
      "checkpoint", "List, inspect or verify the checkpoints in a directory (ls|inspect|verify)");
  cmd->require_subcommand(1);
  auto args = std::make_shared<Args>();
  auto add = [&](const char* name, const char* help, int (*fn)(const Args&)) {
    auto* sub = cmd->add_subcommand(name, help);
    sub->add_option("PATH", args->path,
                    "a checkpoint directory, or the directory that holds them (step-*)")
        ->required();
    if (fn != list) {
      sub->add_option("--step", args->step, "the checkpoint of this step (PATH holds them)")
          ->check(CLI::NonNegativeNumber);
    }
    if (fn == inspect) {
      sub->add_flag("--shards", args->shards, "list every shard: box, rank, file, byte range");
      sub->add_flag("--json", args->json, "print the manifest as it is stored");
    }
    sub->callback([run, fn, args] { *run = [fn, args] { return fn(*args); }; });
  };
  add("ls", "list the checkpoints: step, complete or not, size, world size, layout", list);
  add("inspect", "show a manifest: step, scalars, tensors (newest complete unless --step)",
      inspect);
  add("verify", "read every byte and check every checksum (all checkpoints unless --step)", verify);
}

}  // namespace rally::cli
