#include "collectives/mpi/internal/mpi_process.h"

#include <array>
#include <cstdlib>
#include <cstring>

#include "collectives/internal/reduce.h"
#include "collectives/mpi/mpi_communicator.h"

namespace rally::collectives::internal {
namespace {

std::string_view threadLevelName(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE:
      return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED:
      return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED:
      return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE:
      return "MPI_THREAD_MULTIPLE";
  }
  return "an unknown MPI thread level";
}

std::string mpiErrorString(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) return fmt::format("MPI error {}", rc);
  return std::string(text, static_cast<size_t>(length));
}

// f16 and bf16 have no MPI type: they travel as MPI_UINT16_T and are reduced by these user-defined
// operations (MPI: inout[i] = in[i] op inout[i]; every op here is commutative).
template <DataType kType, ReduceOp kOp>
void reduce16(void* in, void* inout, int* len, MPI_Datatype* /*type*/) {
  internal::reduce(kType, kOp, inout, in, inout, static_cast<size_t>(*len));
}

static_assert(static_cast<size_t>(DataType::kU8) == 6, "mpiType's table follows DataType");
template <DataType kType>
constexpr std::array<MPI_User_function*, kReduceOps> kReduce16 = {
    &reduce16<kType, ReduceOp::kSum>, &reduce16<kType, ReduceOp::kAvg>,
    &reduce16<kType, ReduceOp::kMin>, &reduce16<kType, ReduceOp::kMax>,
    &reduce16<kType, ReduceOp::kProd>};

}  // namespace

// The one wrapper for MPI's return codes: the call, file:line and MPI's own error string. Errors
// MPI does not classify further get `fallback`: Internal where rally posts an operation (it checked
// the arguments), PeerLost where an operation the other ranks took part in completes with an error.
Status mpiStatus(int rc, std::string_view call, const char* file, int line, StatusCode fallback) {
  if (rc == MPI_SUCCESS) return okStatus();
  int error_class = rc;
  MPI_Error_class(rc, &error_class);
  StatusCode code = fallback;
  std::string hint;
  if (error_class == MPI_ERR_TRUNCATE) {
    code = StatusCode::kInvalidArgument;
    hint =
        " (a message was longer than its receive buffer: send and recv must agree on count and "
        "type)";
  } else if (error_class == MPI_ERR_NO_MEM) {
    code = StatusCode::kResourceExhausted;
  }
  const char* slash = std::strrchr(file, '/');
  return Status(code, fmt::format("{} failed ({}:{}): {}{}", call, slash ? slash + 1 : file, line,
                                  mpiErrorString(rc), hint));
}

Result<MpiProcess*> MpiProcess::initialise() {
  int initialised = 0, finalized = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalized);
  if (finalized) {
    return failedPrecondition(
        "the MPI backend cannot start: MPI was already finalized in this process, and MPI can be "
        "initialised only once per process; create MPI communicators before MPI_Finalize");
  }
  int provided = MPI_THREAD_SINGLE;
  if (!initialised) {
    if (!launchedByMpi()) {
      return failedPrecondition(
          "the MPI backend serves only jobs started by mpirun/mpiexec or srun, and none of "
          "OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK is set; start the job with "
          "`mpirun -n N ...`, or use the gloo (CPU) or nccl (GPU) backend");
    }
    const int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided);
    if (rc != MPI_SUCCESS) {
      return mpiStatus(rc, "MPI_Init_thread", __FILE__, __LINE__, StatusCode::kUnavailable);
    }
    // Errors of calls on no communicator of ours (MPI_Comm_idup of the world, MPI_Op_create)
    // are returned, not fatal; MPI is ours, so this changes nothing the program set.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  } else {
    MPI_Query_thread(&provided);
  }
  // Lives as long as MPI: never deleted. Finalizes at exit what rally initialised, also when
  // the thread level below turns out too low.
  auto* process = new MpiProcess(provided);
  if (!initialised) {
    instance_ = process;
    std::atexit(&finalizeAtExit);
  }
  if (provided < MPI_THREAD_SERIALIZED) {
    return failedPrecondition(fmt::format(
        "the MPI backend needs MPI_THREAD_SERIALIZED or MPI_THREAD_MULTIPLE (it calls MPI from "
        "its executor threads), but MPI gives {}; {}",
        threadLevelName(provided),
        initialised ? "initialise MPI with MPI_Init_thread(..., MPI_THREAD_MULTIPLE, ...), or let "
                      "createMpiCommunicator() initialise it"
                    : "use an MPI library built with thread support"));
  }
  for (int t = 0; t < 2; ++t) {
    const auto& fns = t == 0 ? kReduce16<DataType::kF16> : kReduce16<DataType::kBF16>;
    for (size_t i = 0; i < kReduceOps; ++i) {
      const int rc = MPI_Op_create(fns[i], /*commute=*/1, &process->ops16_[t][i]);
      if (rc != MPI_SUCCESS) {
        return mpiStatus(rc, "MPI_Op_create", __FILE__, __LINE__, StatusCode::kInternal)
            .addContext("while creating the f16/bf16 reductions");
      }
    }
  }
  return process;
}

void MpiProcess::finalizeAtExit() {
  MpiProcess* p = instance_;
  std::unique_lock lock(p->mu_);
  p->finalized_ = true;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;  // the program did it
  for (auto& ops : p->ops16_) {
    for (auto& op : ops) {
      if (op != MPI_OP_NULL) MPI_Op_free(&op);
    }
  }
  MPI_Finalize();
}

void MpiProcess::sweepLocked() {
  auto entry = enter();
  if (!entry) return;
  std::erase_if(retired_, [](Retired& r) {
    std::erase_if(r.requests, [](AbandonedRequest& a) {
      int done = 0;
      // An error completes the request as well; there is nobody left to report it to.
      return MPI_Test(&a.request, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || done != 0;
    });
    if (!r.requests.empty()) return false;
    if (r.comm != nullptr && *r.comm != MPI_COMM_NULL) MPI_Comm_free(r.comm.get());
    return true;
  });
}

MPI_Datatype mpiType(DataType t) {
  // By DataType: kF32, kF64, kF16, kBF16, kI32, kI64, kU8 (16-bit floats travel as 16-bit words).
  static const MPI_Datatype kTypes[] = {MPI_FLOAT,   MPI_DOUBLE,  MPI_UINT16_T, MPI_UINT16_T,
                                        MPI_INT32_T, MPI_INT64_T, MPI_UINT8_T};
  return kTypes[static_cast<size_t>(t)];
}

MPI_Op mpiOp(const MpiProcess& process, DataType t, ReduceOp op) {
  if (t == DataType::kF16 || t == DataType::kBF16) return process.op16(t, op);
  static const MPI_Op kOps[kReduceOps] = {MPI_SUM, MPI_SUM, MPI_MIN, MPI_MAX, MPI_PROD};
  return kOps[static_cast<size_t>(op)];
}

}  // namespace rally::collectives::internal
