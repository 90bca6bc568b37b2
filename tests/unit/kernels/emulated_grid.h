// A CUDA grid emulated on the CPU, for kernel_bodies.h's bodies: blocks one after another, and in
// each each() every thread index in turn, both forwards or both backwards. A body whose result
// depends on the order of its threads within one each() (two threads writing one place, or one
// reading what another writes without a barrier between), or of its blocks, gives different
// results in the two orders: that is how the tests find such races without a GPU. And since a
// barrier does nothing here, the emulator insists on one between any two each() (it throws
// std::logic_error otherwise), so a missing __syncthreads cannot pass unseen. It also refuses
// each() or sync() inside each() (a barrier in divergent code), and flagIfAny() called by some
// threads of an each() but not all (a warp vote needs every lane).
//
// What it cannot see: a variable declared outside each() and written inside it is one variable
// here but one per thread on a GPU. kernel_bodies.h's rules forbid that; reviews must enforce it.
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
    if (in_each_) misuse("each() inside each(): a barrier in code that only some threads run");
    if (!synced_) {
      misuse(
          "a kernel body ran each() twice without b.sync() between them: on a GPU the second "
          "part's threads could run before the first part's have finished");
    }
    synced_ = false;
    in_each_ = true;
    votes_ = 0;
    for (unsigned i = 0; i < size_; ++i) f(order_ == ThreadOrder::kForwards ? i : size_ - 1 - i);
    in_each_ = false;
    if (votes_ != 0 && votes_ != size_) {
      misuse(
          "flagIfAny() ran in some threads of an each() but not all: a warp vote needs every lane");
    }
  }
  void sync() const {  // each() has run every thread to its end
    if (in_each_) misuse("sync() inside each(): a barrier in code that only some threads run");
    synced_ = true;
  }
  void flagIfAny(bool bad, int* flag) const {
    if (!in_each_) misuse("flagIfAny() outside each()");
    ++votes_;
    if (bad) *flag = 1;
  }

 private:
  unsigned index_, count_, size_;
  ThreadOrder order_;
  mutable bool synced_ = true;
  mutable bool in_each_ = false;
  mutable unsigned votes_ = 0;

  [[noreturn]] static void misuse(const char* what) { throw std::logic_error(what); }
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
