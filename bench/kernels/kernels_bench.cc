// Kernels benchmark (needs a CUDA device; run it with the `device` tool): for each kernel and size,
// the time per call (calls queued back to back, timed with CUDA events: timeIt), the bytes it
// moves, the achieved GB/s and its fraction of this device's copy bandwidth (a device-to-device
// cudaMemcpy of the same size, timed the same way in the same run); a read-only reference
// (bench::readOnce: the same bytes read once), the ceiling of a kernel that only reads, as the
// checksums do; two rows more show the calls that wait for the device (scaleAndCheck,
// blockChecksums to host memory) with that wait; more rows the candidate arrangements of the
// checksums (checksum_candidates.h), each first checked against the kernels' own; and the
// multi-tensor operations beside the same work done with one launch per tensor (what a
// framework does), for 500 small tensors: one cudaMemcpyAsync per tensor for pack and unpack,
// one plain AdamW launch per tensor (per_tensor_adamw.h: pointers as arguments, no table) for
// AdamW.
//
//   kernels_bench [--sizes 64MiB,256MiB,1GiB] [--tensors 500] [--chunks 256,512,1024,2048,4096]
//
// --chunks: pack and AdamW at the first size again with each chunk size (elements per thread
// block, CudaKernelsOptions::chunk_elements), to choose the default (the main table uses the
// current default).
//
// Last line: "kernels min_fraction_of_copy_bw=F vs_per_tensor_speedup=S" (F over sizes of 64 MiB
// and up, the rows that do not wait; S the smallest speedup of the fused pack, unpack and AdamW
// over one launch per tensor).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "bench/kernels/checksum_candidates.h"
#include "bench/kernels/per_tensor_adamw.h"
#include "kernels/base/units.h"
#include "kernels/ops/cuda_kernels.h"

namespace {

using namespace rally;           // NOLINT(google-build-using-namespace): a benchmark
using namespace rally::kernels;  // NOLINT

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "kernels_bench: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}
void check(const Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "kernels_bench: %s: %s\n", what, s.toString().c_str());
    std::exit(1);
  }
}

// Seconds per call of f: calls queued back to back (as a training step queues them), timed with
// CUDA events on the default stream, in batches of `per_batch` after a warm-up; the median of
// `batches` batches. A call that waits for the device itself (readFinite, blockChecksums to host
// memory) pays that wait in every call.
double timeIt(const std::function<void()>& f, int per_batch = 10, int batches = 5) {
  f();  // warm up
  check(cudaDeviceSynchronize(), "warm-up");
  cudaEvent_t start = nullptr, end = nullptr;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&end), "cudaEventCreate");
  std::vector<double> t;
  for (int b = 0; b < batches; ++b) {
    check(cudaEventRecord(start, nullptr), "cudaEventRecord");
    for (int i = 0; i < per_batch; ++i) f();
    check(cudaEventRecord(end, nullptr), "cudaEventRecord");
    check(cudaEventSynchronize(end), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start, end), "cudaEventElapsedTime");
    t.push_back(ms / 1e3 / per_batch);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(end);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string sizes_arg = "64MiB,256MiB,1GiB";
  int tensors = 500;
  std::string chunks_arg = "256,512,1024,2048,4096";
  for (int i = 1; i < argc; i += 2) {
    const std::string a = argv[i];
    if (i + 1 >= argc || (a != "--sizes" && a != "--tensors" && a != "--chunks")) {
      std::fprintf(stderr,
                   "kernels_bench: '%s' is not one of --sizes LIST, --tensors N, --chunks LIST "
                   "(each with a value)\n",
                   a.c_str());
      return 2;
    }
    if (a == "--sizes")
      sizes_arg = argv[i + 1];
    else if (a == "--tensors")
      tensors = std::max(1, std::atoi(argv[i + 1]));
    else
      chunks_arg = argv[i + 1];
  }
  std::vector<std::int64_t> sizes;
  for (size_t pos = 0; pos <= sizes_arg.size();) {
    size_t end = sizes_arg.find(',', pos);
    if (end == std::string::npos) end = sizes_arg.size();
    auto v = parseBytes(sizes_arg.substr(pos, end - pos));
    if (!v.ok()) return std::fprintf(stderr, "kernels_bench: bad size\n"), 2;
    sizes.push_back(*v);
    pos = end + 1;
  }
  auto k = cudaKernels({.device = 0});
  check(k.status(), "starting the CUDA kernels");
  check(bench::prepareChecksumCandidates(), "copying the secret for the candidate checksums");
  Kernels& K = **k;
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "device properties");
  std::printf("device: %s\n", prop.name);
  std::printf("%-34s %10s %10s %10s %9s\n", "kernel", "size", "time_us", "GB/s", "of_copy");
  double min_fraction = 1e9;
  for (std::int64_t size : sizes) {
    const size_t bytes = static_cast<size_t>(size), n = bytes / 4;
    void *a = nullptr, *b = nullptr, *c = nullptr, *d = nullptr, *e = nullptr;
    for (void** p : {&a, &b, &c, &d, &e}) check(cudaMalloc(p, bytes), "cudaMalloc");
    check(cudaMemset(a, 1, bytes), "memset");
    check(cudaMemset(b, 0, bytes), "memset");
    check(cudaMemset(c, 0, bytes), "memset");
    check(cudaMemset(d, 0, bytes), "memset");
    const double copy =
        timeIt([&] { check(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice), "copy"); });
    const double copy_bw = 2.0 * bytes / copy / 1e9;
    std::printf("%-34s %10s %10.1f %10.1f %9.3f\n", "memcpy (reference)", formatBytes(size).c_str(),
                copy * 1e6, copy_bw, 1.0);
    std::uint64_t* sink = nullptr;
    check(cudaMalloc(&sink, 65535 * 8 * sizeof(std::uint64_t)), "cudaMalloc");
    const double read =
        timeIt([&] { check(bench::readOnce(a, bytes, sink, nullptr), "read reference"); });
    std::printf("%-34s %10s %10.1f %10.1f %9.3f\n", "read only (reference)",
                formatBytes(size).c_str(), read * 1e6, bytes / read / 1e9,
                bytes / read / 1e9 / copy_bw);
    cudaFree(sink);
    std::vector<std::uint64_t> sums(bytes / 65536 + 1);
    std::uint64_t* device_sums = nullptr;
    check(cudaMalloc(&device_sums, sums.size() * sizeof(std::uint64_t)), "cudaMalloc");
    struct Row {
      const char* name;
      double moved;  // bytes read + written
      std::function<void()> run;
      bool waits = false;  // waits for the device in every call: not in min_fraction
    };
    const std::vector<Row> rows = {
        {"pack (1 tensor)", 2.0 * bytes,
         [&] {
           check(K.pack({{a, n}}, b, DType::kF32), "pack");
         }},
        {"unpack (1 tensor)", 2.0 * bytes,
         [&] {
           check(K.unpack(b, {{a, n}}, DType::kF32), "unpack");
         }},
        {"scale_and_check f32", 2.0 * bytes,
         [&] { check(K.scaleAndCheckAsync(b, n, DType::kF32, 0.5f), "scale"); }},
        {"scale_and_check bf16", 2.0 * bytes,
         [&] { check(K.scaleAndCheckAsync(b, bytes / 2, DType::kBF16, 0.5f), "scale"); }},
        {"compress_bf16", n * (4.0 + 4 + 4 + 2),
         [&] {
           check(K.compressBf16(static_cast<float*>(a), static_cast<float*>(c),
                                static_cast<std::uint16_t*>(d), n),
                 "compress");
         }},
        {"decompress_bf16", n * (2.0 + 4),
         [&] {
           check(K.decompressBf16(static_cast<std::uint16_t*>(d), static_cast<float*>(b), n),
                 "decompress");
         }},
        {"block_checksums 64KiB", 1.0 * bytes,
         [&] { check(K.blockChecksumsAsync(a, bytes, 65536, device_sums), "checksums"); }},
        {"adamw (+bf16 copy)", (n / 4) * (16.0 + 14),
         [&] {
           const size_t q = n / 4;
           check(K.adamw(
                     {{static_cast<float*>(b), static_cast<const float*>(a), static_cast<float*>(c),
                       static_cast<float*>(d), static_cast<std::uint16_t*>(e), q}},
                     {.lr = 1e-4f, .step = 1}),
                 "adamw");
         }},
        {"  scale_and_check, waits", 2.0 * bytes,
         [&] { check(K.scaleAndCheck(b, n, DType::kF32, 0.5f).status(), "scale"); }, true},
        {"  checksums to host, waits", 1.0 * bytes,
         [&] { check(K.blockChecksums(a, bytes, 65536, sums.data()), "checksums"); }, true},
    };
    for (const Row& r : rows) {
      const double t = timeIt(r.run);
      const double bw = r.moved / t / 1e9, fraction = bw / copy_bw;
      std::printf("%-34s %10s %10.1f %10.1f %9.3f\n", r.name, formatBytes(size).c_str(), t * 1e6,
                  bw, fraction);
      if (size >= (64 << 20) && !r.waits) min_fraction = std::min(min_fraction, fraction);
    }
    // The candidate arrangements of the checksums (checksum_candidates.h), not in min_fraction:
    // each must give the kernels' own checksums of random bytes, over the whole buffer and over one
    // 44 bytes short of it (a partial last block, whose final stripe is not 8-byte aligned), into
    // memory overwritten first; then it is timed the same way.
    const size_t checksum_blocks = (bytes + 65535) / 65536;
    check(bench::fillRandom(b, bytes, 0x5eed + bytes, nullptr), "filling random bytes");
    std::vector<std::uint64_t> want, got;
    const auto sums_of = [&](const char* who, size_t length, auto&& launch) {
      check(cudaMemset(device_sums, 0xff, checksum_blocks * 8), "clearing checksums");
      launch(length);
      std::vector<std::uint64_t> out((length + 65535) / 65536);
      check(cudaMemcpy(out.data(), device_sums, out.size() * 8, cudaMemcpyDeviceToHost), who);
      return out;
    };
    const auto ours = [&](size_t length) {
      check(K.blockChecksumsAsync(b, length, 65536, device_sums), "checksums");
    };
    for (const bench::ChecksumCandidate& cand : bench::kChecksumCandidates) {
      const auto candidate = [&](size_t length) {
        check(bench::checksumsCandidate(cand, b, length, 65536, device_sums, nullptr),
              "candidate checksums");
      };
      for (size_t length : {bytes, bytes - 44}) {
        want = sums_of("copying checksums", length, ours);
        got = sums_of("copying candidate checksums", length, candidate);
        const auto bad = std::mismatch(want.begin(), want.end(), got.begin());
        if (bad.first != want.end()) {
          std::fprintf(stderr,
                       "kernels_bench: candidate checksums (%s) differ from the kernels' own at "
                       "block %zu of %zu bytes: %016llx, not %016llx\n",
                       cand.name, static_cast<size_t>(bad.first - want.begin()), length,
                       static_cast<unsigned long long>(*bad.second),
                       static_cast<unsigned long long>(*bad.first));
          return 1;
        }
      }
      const auto run = [&] { candidate(bytes); };
      const double t = timeIt(run);
      const std::string name = std::string("  checksums, ") + cand.name;
      std::printf("%-34s %10s %10.1f %10.1f %9.3f\n", name.c_str(), formatBytes(size).c_str(),
                  t * 1e6, bytes / t / 1e9, bytes / t / 1e9 / copy_bw);
    }
    for (void* p : {a, b, c, d, e}) cudaFree(p);
    cudaFree(device_sums);
  }
  // Many small tensors: one fused launch against one launch (or copy) per tensor.
  const size_t per = 4096;  // floats per tensor: 16 KiB, a typical bias or norm gradient
  void *src = nullptr, *dst = nullptr, *m = nullptr, *v = nullptr;
  const size_t total = per * static_cast<size_t>(tensors);
  for (void** p : {&src, &dst, &m, &v}) check(cudaMalloc(p, total * 4), "cudaMalloc");
  check(cudaMemset(src, 1, total * 4), "memset");
  std::vector<ConstTensorView> in;
  std::vector<TensorView> out;
  std::vector<AdamWTensor> adam;
  for (int i = 0; i < tensors; ++i) {
    in.push_back({static_cast<float*>(src) + i * per, per});
    out.push_back({static_cast<float*>(dst) + i * per, per});
    adam.push_back({static_cast<float*>(dst) + i * per, static_cast<const float*>(src) + i * per,
                    static_cast<float*>(m) + i * per, static_cast<float*>(v) + i * per, nullptr,
                    per});
  }
  const double fused_pack = timeIt([&] { check(K.pack(in, dst, DType::kF32), "pack"); });
  const double each_pack = timeIt([&] {
    for (int i = 0; i < tensors; ++i) {
      check(cudaMemcpyAsync(static_cast<float*>(dst) + i * per, in[i].data, per * 4,
                            cudaMemcpyDeviceToDevice),
            "copy");
    }
  });
  const double fused_unpack = timeIt([&] { check(K.unpack(src, out, DType::kF32), "unpack"); });
  // One plain copy per tensor for both directions: what a framework's per-tensor copy_ costs (our
  // own unpack per tensor would also upload a chunk table each time, flattering the fused one).
  const double each_unpack = timeIt([&] {
    for (int i = 0; i < tensors; ++i) {
      check(cudaMemcpyAsync(out[i].data, static_cast<const float*>(src) + i * per, per * 4,
                            cudaMemcpyDeviceToDevice),
            "copy");
    }
  });
  const double fused_adam = timeIt([&] { check(K.adamw(adam, {.step = 1}), "adamw"); });
  const double each_adam = timeIt([&] {
    for (const AdamWTensor& t : adam)
      check(bench::adamwOneTensor(t, {.step = 1}, nullptr), "adamw");
  });
  std::printf("\n%d tensors of %zu floats: fused vs one launch per tensor (us)\n", tensors, per);
  std::printf("pack   %10.1f %10.1f  speedup %.1fx\n", fused_pack * 1e6, each_pack * 1e6,
              each_pack / fused_pack);
  std::printf("unpack %10.1f %10.1f  speedup %.1fx\n", fused_unpack * 1e6, each_unpack * 1e6,
              each_unpack / fused_unpack);
  std::printf("adamw  %10.1f %10.1f  speedup %.1fx\n", fused_adam * 1e6, each_adam * 1e6,
              each_adam / fused_adam);
  const double speedup =
      std::min({each_pack / fused_pack, each_unpack / fused_unpack, each_adam / fused_adam});
  for (void* p : {src, dst, m, v}) cudaFree(p);

  // The chunk size: pack (one tensor) and AdamW at the first size, per chunk size.
  {
    const size_t bytes = static_cast<size_t>(sizes.front()), n = bytes / 4, q = n / 4;
    void *a = nullptr, *b = nullptr, *c = nullptr, *d = nullptr, *e = nullptr;
    for (void** p : {&a, &b, &c, &d, &e}) check(cudaMalloc(p, bytes), "cudaMalloc");
    for (void* p : {a, b, c, d, e}) check(cudaMemset(p, 0, bytes), "memset");
    const double copy =
        timeIt([&] { check(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice), "copy"); });
    const double copy_bw = 2.0 * bytes / copy / 1e9;
    std::printf("\nchunk size (elements per block), %s: fraction of copy bandwidth\n",
                formatBytes(sizes.front()).c_str());
    std::printf("%10s %10s %10s\n", "chunk", "pack", "adamw");
    for (size_t pos = 0; pos <= chunks_arg.size();) {
      size_t end = chunks_arg.find(',', pos);
      if (end == std::string::npos) end = chunks_arg.size();
      const size_t chunk = std::strtoull(chunks_arg.substr(pos, end - pos).c_str(), nullptr, 10);
      pos = end + 1;
      auto kc = cudaKernels({.device = 0, .chunk_elements = chunk});
      check(kc.status(), "starting the CUDA kernels with --chunks");
      Kernels& KC = **kc;
      const double pack = timeIt([&] { check(KC.pack({{a, n}}, b, DType::kF32), "pack"); });
      const double adam = timeIt([&] {
        check(
            KC.adamw({{static_cast<float*>(b), static_cast<const float*>(a), static_cast<float*>(c),
                       static_cast<float*>(d), static_cast<std::uint16_t*>(e), q}},
                     {.lr = 1e-4f, .step = 1}),
            "adamw");
      });
      std::printf("%10zu %10.3f %10.3f\n", chunk, 2.0 * bytes / pack / 1e9 / copy_bw,
                  q * 30.0 / adam / 1e9 / copy_bw);
    }
    for (void* p : {a, b, c, d, e}) cudaFree(p);
  }
  std::printf("kernels min_fraction_of_copy_bw=%.3f vs_per_tensor_speedup=%.1f\n", min_fraction,
              speedup);
  return 0;
}
