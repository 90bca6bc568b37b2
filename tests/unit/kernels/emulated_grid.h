// A CUDA grid emulated on the CPU, for kernel_bodies.h's bodies: blocks one after another, and in
// each each() every thread index in turn, both forwards or both backwards. A body whose result
// depends on the order of its threads within one each() (two threads writing one place, or one
// reading what another writes without a barrier between), or of its blocks, gives different
// results in the two orders: that is how the tests find such races without a GPU. And since a
// barrier does nothing here, the emulator insists on one between any two each() (it throws
// std::logic_error otherwise), so a missing __syncthreads cannot pass unseen.
//
//   emulateGrid(gridFor(n), kThreads, [&](const auto& b) { scaleCheckBody<T>(b, ...); });
#pragma once

#include <stdexcept>

namespace rally::kernels::internal {

enum class ThreadOrder { kForwards, kBackwards };

class EmulatedBlock {
 public:
  EmulatedBlock(unsigned index, unsigned count, unsigned size, ThreadOrder order)
      : index_(index), count_(count), size_(size), order_(order) {}
  unsigned index() const { return index_; }
  unsigned count() const { return count_; }
  unsigned size() const { return size_; }
  template <class F>
  void each(F&& f) const {
    if (!synced_) {
      throw std::logic_error(
          "a kernel body ran each() twice without b.sync() between them: on a GPU the second "
          "part's threads could run before the first part's have finished");
    }
    synced_ = false;
    for (unsigned i = 0; i < size_; ++i) f(order_ == ThreadOrder::kForwards ? i : size_ - 1 - i);
  }
  void sync() const { synced_ = true; }  // each() has run every thread to its end
  void flagIfAny(bool bad, int* flag) const {
    if (bad) *flag = 1;
  }

 private:
  unsigned index_, count_, size_;
  ThreadOrder order_;
  mutable bool synced_ = true;
};

// body(block) for every block of a grid of `blocks` blocks of `threads` threads.
template <class Body>
void emulateGrid(unsigned blocks, unsigned threads, Body&& body,
                 ThreadOrder order = ThreadOrder::kForwards) {
  for (unsigned i = 0; i < blocks; ++i) {
    body(EmulatedBlock(order == ThreadOrder::kForwards ? i : blocks - 1 - i, blocks, threads,
                       order));
  }
}

}  // namespace rally::kernels::internal
