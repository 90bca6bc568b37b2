#include "collectives/communicator.h"

#include <fmt/format.h>

namespace rally::collectives {

size_t dataTypeSize(DataType t) {
  switch (t) {
    case DataType::kF32:
      return 4;
    case DataType::kF64:
      return 8;
    case DataType::kF16:
      return 2;
    case DataType::kBF16:
      return 2;
    case DataType::kI32:
      return 4;
    case DataType::kI64:
      return 8;
    case DataType::kU8:
      return 1;
  }
  return 1;
}

std::string_view dataTypeName(DataType t) {
  switch (t) {
    case DataType::kF32:
      return "f32";
    case DataType::kF64:
      return "f64";
    case DataType::kF16:
      return "f16";
    case DataType::kBF16:
      return "bf16";
    case DataType::kI32:
      return "i32";
    case DataType::kI64:
      return "i64";
    case DataType::kU8:
      return "u8";
  }
  return "?";
}

Result<Grid> makeGrid(Communicator& world, int tp_size) {
  if (tp_size < 1 || world.size() % tp_size != 0) {
    return invalidArgument(fmt::format(
        "a grid with tensor-parallel size {} needs a world size that is a multiple of it, not {}",
        tp_size, world.size()));
  }
  Grid grid;
  auto tp = world.split(world.rank() / tp_size, world.rank());
  RALLY_RETURN_IF_ERROR(tp.status()) << "while forming the tensor-parallel groups";
  auto dp = world.split(world.rank() % tp_size, world.rank());
  RALLY_RETURN_IF_ERROR(dp.status()) << "while forming the data-parallel groups";
  grid.tp = std::move(*tp);
  grid.dp = std::move(*dp);
  return grid;
}

std::string_view reduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kAvg:
      return "avg";
    case ReduceOp::kMin:
      return "min";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kProd:
      return "prod";
  }
  return "?";
}

}  // namespace rally::collectives
