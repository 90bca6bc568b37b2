// `rally checkpoint ls|inspect|verify`: look into a checkpoint directory without training code.
//
//   rally checkpoint ls /ckpt/run1                 # steps, complete or not, sizes, layouts
//   rally checkpoint inspect /ckpt/run1 --step 100 # a manifest: scalars, tensors, shards
//   rally checkpoint verify /ckpt/run1             # every byte against its checksum
//
// PATH is a checkpoint directory (DIR/step-000000000100) or the directory that holds them; with
// the latter, inspect takes the newest complete checkpoint (or --step) and verify checks them all
// (or --step). Exit status: 0 all is well, 1 a problem was found (listed), 2 bad usage.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

namespace rally::cli {

void addCheckpointCommand(CLI::App& app, std::function<int()>* run);

}  // namespace rally::cli
