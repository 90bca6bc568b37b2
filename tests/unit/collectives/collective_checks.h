// Checks shared by every backend's tests: an in-memory BootstrapStore, values stored in and read
// from any dtype, and each operation x dtype x reduce op against references computed here (odd
// counts, zero-length buffers). Each check runs on one rank of an `n`-rank communicator; every rank
// calls the same checks in the same order.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "collectives/communicator.h"
#include "collectives/internal/reduce.h"
#include "collectives/memory_bootstrap_store.h"

namespace rally::collectives::test_support {

using std::chrono::milliseconds;

using MemoryStore = MemoryBootstrapStore;

// Values as doubles, stored in and read from any dtype.
inline void store(DataType t, void* p, size_t i, double v) {
  switch (t) {
    case DataType::kF32:
      static_cast<float*>(p)[i] = static_cast<float>(v);
      break;
    case DataType::kF64:
      static_cast<double*>(p)[i] = v;
      break;
    case DataType::kI32:
      static_cast<std::int32_t*>(p)[i] = static_cast<std::int32_t>(v);
      break;
    case DataType::kI64:
      static_cast<std::int64_t*>(p)[i] = static_cast<std::int64_t>(v);
      break;
    case DataType::kU8:
      static_cast<std::uint8_t*>(p)[i] = static_cast<std::uint8_t>(v);
      break;
    case DataType::kF16:
      static_cast<std::uint16_t*>(p)[i] = internal::floatToHalf(static_cast<float>(v));
      break;
    case DataType::kBF16:
      static_cast<std::uint16_t*>(p)[i] = internal::floatToBf16(static_cast<float>(v));
      break;
  }
}
inline double load(DataType t, const void* p, size_t i) {
  switch (t) {
    case DataType::kF32:
      return static_cast<const float*>(p)[i];
    case DataType::kF64:
      return static_cast<const double*>(p)[i];
    case DataType::kI32:
      return static_cast<const std::int32_t*>(p)[i];
    case DataType::kI64:
      return static_cast<const std::int64_t*>(p)[i];
    case DataType::kU8:
      return static_cast<const std::uint8_t*>(p)[i];
    case DataType::kF16:
      return internal::halfToFloat(static_cast<const std::uint16_t*>(p)[i]);
    case DataType::kBF16:
      return internal::bf16ToFloat(static_cast<const std::uint16_t*>(p)[i]);
  }
  return 0;
}
inline bool isFloat(DataType t) {
  return t == DataType::kF32 || t == DataType::kF64 || t == DataType::kF16 || t == DataType::kBF16;
}
inline double tolerance(DataType t, double expected) {
  switch (t) {
    case DataType::kF16:
      return 2e-3 * std::abs(expected) + 1e-3;
    case DataType::kBF16:
      return 1e-2 * std::abs(expected) + 1e-2;
    default:
      return 1e-6 * std::abs(expected) + 1e-9;
  }
}

// Small values, so that sums and products are exact in every dtype (u8 products stay below 256).
inline double value(ReduceOp op, int rank, size_t i) {
  if (op == ReduceOp::kProd) return 1 + static_cast<double>((rank + i) % 2);
  return static_cast<double>((rank * 3 + i * 7) % 6);
}

inline double expected(DataType t, ReduceOp op, int n, size_t i) {
  double acc = value(op, 0, i);
  for (int r = 1; r < n; ++r) {
    const double v = value(op, r, i);
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg:
        acc += v;
        break;
      case ReduceOp::kProd:
        acc *= v;
        break;
      case ReduceOp::kMin:
        acc = std::min(acc, v);
        break;
      case ReduceOp::kMax:
        acc = std::max(acc, v);
        break;
    }
  }
  if (op == ReduceOp::kAvg) acc = isFloat(t) ? acc / n : std::trunc(acc / n);
  return acc;
}

constexpr DataType kTypes[] = {DataType::kF32, DataType::kF64, DataType::kF16, DataType::kBF16,
                               DataType::kI32, DataType::kI64, DataType::kU8};
constexpr ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin, ReduceOp::kMax,
                             ReduceOp::kProd};
constexpr size_t kCounts[] = {0, 1, 3, 1001};

// Every reduce op for every dtype and count.
inline void checkAllreduceEveryTypeAndOp(int rank, int n, Communicator& comm) {
  for (DataType t : kTypes) {
    for (ReduceOp op : kOps) {
      for (size_t count : kCounts) {
        std::vector<char> buf(count * dataTypeSize(t) + 1);
        for (size_t i = 0; i < count; ++i) store(t, buf.data(), i, value(op, rank, i));
        ASSERT_TRUE(comm.allreduce(buf.data(), count, t, op)->wait(milliseconds(20000)).ok());
        for (size_t i = 0; i < count; ++i) {
          const double want = expected(t, op, n, i);
          ASSERT_NEAR(load(t, buf.data(), i), want, tolerance(t, want))
              << "rank " << rank << " " << dataTypeName(t) << " " << reduceOpName(op) << " count "
              << count << " element " << i;
        }
      }
    }
  }
}

// Broadcast from every root, allgather, alltoall and reduce-scatter for every dtype and count.
inline void checkBroadcastAllgatherAlltoallReduceScatter(int rank, int n, Communicator& comm) {
  for (DataType t : kTypes) {
    for (size_t count : kCounts) {
      const size_t es = dataTypeSize(t);
      for (int root = 0; root < n; ++root) {  // broadcast from every root
        std::vector<char> b(count * es + 1);
        for (size_t i = 0; i < count; ++i)
          store(t, b.data(), i, rank == root ? (i + root) % 7 : 99);
        ASSERT_TRUE(comm.broadcast(b.data(), count, t, root)->wait(milliseconds(20000)).ok());
        for (size_t i = 0; i < count; ++i) ASSERT_EQ(load(t, b.data(), i), (i + root) % 7);
      }
      std::vector<char> in(count * es * n + 1), out(count * es * n + 1);
      for (size_t i = 0; i < count; ++i) store(t, in.data(), i, (rank + i) % 5);
      ASSERT_TRUE(comm.allgather(in.data(), out.data(), count, t)->wait(milliseconds(20000)).ok());
      for (int r = 0; r < n; ++r) {
        for (size_t i = 0; i < count; ++i)
          ASSERT_EQ(load(t, out.data(), r * count + i), (r + i) % 5);
      }
      // alltoall: block j of rank r's input holds r*10 + j; rank r receives j*10 + r from rank j.
      for (int j = 0; j < n; ++j) {
        for (size_t i = 0; i < count; ++i)
          store(t, in.data(), j * count + i, (rank * 10 + j) % 100);
      }
      ASSERT_TRUE(comm.alltoall(in.data(), out.data(), count, t)->wait(milliseconds(20000)).ok());
      for (int j = 0; j < n; ++j) {
        for (size_t i = 0; i < count; ++i) {
          ASSERT_EQ(load(t, out.data(), j * count + i), (j * 10 + rank) % 100);
        }
      }
      // reduce_scatter (sum): element i of block b is sum over ranks of (r + b + i) % 3.
      for (int b = 0; b < n; ++b) {
        for (size_t i = 0; i < count; ++i) store(t, in.data(), b * count + i, (rank + b + i) % 3);
      }
      ASSERT_TRUE(comm.reduceScatter(in.data(), out.data(), count, t, ReduceOp::kSum)
                      ->wait(milliseconds(20000))
                      .ok());
      for (size_t i = 0; i < count; ++i) {
        double want = 0;
        for (int r = 0; r < n; ++r) want += (r + rank + i) % 3;
        ASSERT_NEAR(load(t, out.data(), i), want, tolerance(t, want));
      }
    }
  }
  ASSERT_TRUE(comm.barrier()->wait(milliseconds(20000)).ok());
}

// Three rounds of send to the right, recv from the left.
inline void checkSendRecvAroundARing(int rank, int n, Communicator& comm) {
  for (int round = 0; round < 3; ++round) {
    std::vector<std::int64_t> out(257, rank * 1000 + round), in(257, -1);
    auto s = comm.send(out.data(), out.size(), DataType::kI64, (rank + 1) % n);
    auto r = comm.recv(in.data(), in.size(), DataType::kI64, (rank + n - 1) % n);
    ASSERT_TRUE(r->wait(milliseconds(20000)).ok());
    ASSERT_TRUE(s->wait(milliseconds(20000)).ok());
    EXPECT_EQ(in.front(), ((rank + n - 1) % n) * 1000 + round);
  }
}

}  // namespace rally::collectives::test_support
