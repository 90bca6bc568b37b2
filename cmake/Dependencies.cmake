# Required dependencies, all from Debian's packages (scripts/install-deps), and optional ones that
# switch features on. Optional parts are built when found and reported in rally/config.h.
find_package(Threads REQUIRED)
find_package(Protobuf REQUIRED)
find_package(gRPC CONFIG REQUIRED)
find_package(spdlog CONFIG REQUIRED)
find_package(fmt CONFIG REQUIRED)
find_package(CLI11 CONFIG REQUIRED)
find_package(nlohmann_json CONFIG REQUIRED)
if(RALLY_BUILD_TESTS)
  find_package(GTest CONFIG REQUIRED)
endif()

find_program(RALLY_PROTOC protoc REQUIRED)
find_program(RALLY_GRPC_CPP_PLUGIN grpc_cpp_plugin REQUIRED)

# Optional: Gloo (CPU collectives).
find_package(Gloo CONFIG QUIET)
set(RALLY_HAVE_GLOO ${Gloo_FOUND})

# Optional: Open MPI.
find_package(MPI QUIET COMPONENTS C)
set(RALLY_HAVE_MPI ${MPI_C_FOUND})

# Optional: CUDA toolkit and NCCL (compiled and linked where present; run only where a GPU exists).
include(CheckLanguage)
if(NOT DEFINED CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
  set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
endif()
check_language(CUDA)
set(RALLY_HAVE_CUDA OFF)
if(CMAKE_CUDA_COMPILER)
  find_package(CUDAToolkit QUIET)
  if(CUDAToolkit_FOUND)
    set(RALLY_HAVE_CUDA ON)
    # rally's own kernels (kernels/ops): Ampere (A100) and Hopper (H100, H200) at least.
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 80 90)
    endif()
    enable_language(CUDA)
  endif()
endif()
set(RALLY_HAVE_NCCL OFF)
if(RALLY_HAVE_CUDA)
  find_path(RALLY_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include)
  find_library(RALLY_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda/lib64)
  if(RALLY_NCCL_INCLUDE_DIR AND RALLY_NCCL_LIBRARY)
    set(RALLY_HAVE_NCCL ON)
  endif()
endif()

# Optional: libtorch (Debian's libtorch-dev; it needs libgloo-dev beside it). Configured only when
# asked for or found cheaply, since its config pulls in a lot.
option(RALLY_WITH_TORCH "Build librally_torch when libtorch is found" ON)
set(RALLY_HAVE_TORCH OFF)
if(RALLY_WITH_TORCH)
  find_package(Torch QUIET)
  if(Torch_FOUND)
    set(RALLY_HAVE_TORCH ON)
  endif()
endif()

foreach(flag RALLY_HAVE_GLOO RALLY_HAVE_MPI RALLY_HAVE_CUDA RALLY_HAVE_NCCL RALLY_HAVE_TORCH)
  if(${flag})
    set(${flag} 1)
  else()
    set(${flag} 0)
  endif()
endforeach()
