"""PyTorch's Gloo allreduce on the same sizes and in the same format as collectives_bench, for
comparison in one run. Ranks are processes (torch.multiprocessing), bootstrapped through a file.

    /usr/bin/python3 bench/collectives/torch_gloo.py --ranks 2 [--min 4] [--max 268435456]
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, n, init_file, min_bytes, max_bytes):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=n)
    if rank == 0:
        print(f"# backend=torch-gloo ranks={n} op=allreduce torch={torch.__version__}")
        print(f"{'size':>12} {'count':>10} {'type':>5} {'redop':>5} {'time_us':>11} "
              f"{'algbw':>8} {'busbw':>8} {'wrong':>6}", flush=True)
    size = min_bytes
    while size <= max_bytes:
        count = size // 4
        t = torch.ones(count, dtype=torch.float32)
        # As collectives_bench: 5 rounds, each timed on its slowest rank; the median round.
        iters = max(1, min(200, (100 << 20) // max(size, 1)))
        for _ in range(3):
            dist.all_reduce(t)
        rounds = torch.zeros(5, dtype=torch.float64)
        for r in range(5):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(t)
            rounds[r] = (time.perf_counter() - t0) / iters * 1e6
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
        us = rounds.median()
        idx = torch.arange(count, dtype=torch.int64)
        x = ((rank * 7 + idx) % 11).to(torch.float32)
        dist.all_reduce(x)
        want = torch.zeros(count, dtype=torch.float32)
        for q in range(n):
            want += ((q * 7 + idx) % 11).to(torch.float32)
        wrong = torch.tensor([float((x != want).sum().item())], dtype=torch.float64)
        dist.all_reduce(wrong, op=dist.ReduceOp.MAX)
        if rank == 0:
            algbw = size / us.item() / 1e3
            print(f"{size:>12} {count:>10} {'float':>5} {'sum':>5} {us.item():>11.2f} "
                  f"{algbw:>8.3f} {algbw * 2 * (n - 1) / n:>8.3f} {int(wrong.item()):>6}",
                  flush=True)
        size *= 2
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--min", type=int, default=4)
    p.add_argument("--max", type=int, default=256 << 20)
    a = p.parse_args()
    fd, init_file = tempfile.mkstemp(prefix="torch-gloo-bench-")
    os.close(fd)
    os.unlink(init_file)
    try:
        mp.spawn(rank_main, args=(a.ranks, init_file, a.min, a.max), nprocs=a.ranks, join=True)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
