#!/usr/bin/python3
"""torch's c10d elastic rendezvous at the sizes it can reach, for a side-by-side with rally's.

N participant processes (forked after importing torch, as torchrun's agents are separate processes)
run DynamicRendezvousHandler.next_rendezvous() against one TCPStore hosted by this process, with
min = max = N (so the round completes when the last participant joins, as in rally's benchmark).
Measured: from the first participant starting its join to the last one holding its rank.

    /usr/bin/python3 bench/rendezvous/torch_c10d.py --sizes 64,128,256 --timeout 90

Ends with one line per size: `c10d agents=N seconds=S` (S is `timeout` if it never completed).
Needs Debian's python3-torch (PyTorch 1.13): run it with /usr/bin/python3.
"""
import argparse
import multiprocessing as mp
import os
import socket
import time
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def participant(port, n, run_id, results):
    params = RendezvousParameters(backend="c10d", endpoint=f"127.0.0.1:{port}", run_id=run_id,
                                  min_nodes=n, max_nodes=n, is_host="false")
    handler = get_rendezvous_handler(params)
    start = time.time()
    try:
        handler.next_rendezvous()
        results.put((os.getpid(), start, time.time(), None))
    except Exception as exc:  # report, do not hang the parent
        results.put((os.getpid(), start, time.time(), repr(exc)))


def run(n, timeout):
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=timeout))
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=participant, args=(port, n, f"bench{n}", results), daemon=True)
             for _ in range(n)]
    for p in procs:
        p.start()
    got, errors = [], []
    deadline = time.time() + timeout
    while len(got) + len(errors) < n and time.time() < deadline:
        try:
            pid, start, end, err = results.get(timeout=max(0.1, deadline - time.time()))
        except Exception:
            break
        (errors if err else got).append((start, end, err))
    for p in procs:
        p.kill()
    for p in procs:
        p.join()
    del store
    if len(got) < n:
        reason = errors[0][2] if errors else f"{len(got)} of {n} had a rank after {timeout} s"
        return None, reason
    return max(e for _, e, _ in got) - min(s for s, _, _ in got), None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128,256")
    ap.add_argument("--timeout", type=float, default=90)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# torch {__import__('torch').__version__} c10d rendezvous, min = max = N")
    lines = []
    for n in sizes:
        seconds, failure = run(n, args.timeout)
        if seconds is None:
            print(f"  {n:>7}  did not complete: {failure}", flush=True)
            lines.append(f"c10d agents={n} seconds=timeout")
        else:
            print(f"  {n:>7}  {seconds:8.3f} s", flush=True)
            lines.append(f"c10d agents={n} seconds={seconds:.3f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
