"""A plain PyTorch DDP training script, written for torchrun: nothing in it knows about rally.

    rally run --nproc-per-node 2 --max-restarts 3 examples/pytorch/train_ddp.py --steps 200
    torchrun --nproc_per_node 2 --max_restarts 3 --redirects 1 --tee 1 examples/pytorch/train_ddp.py

It reads its rank from the environment (init_process_group with the env:// default), trains a small
regression model on synthetic data with the gloo backend, checkpoints every few steps (rank 0 writes,
atomically), and resumes from the newest checkpoint when restarted.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint-dir", default="/tmp/rally-ddp-checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--step-time", type=float, default=0.0,
                        help="seconds to sleep per step, to stretch a short run")
    parser.add_argument("--log-every", type=int, default=10, help="rank 0 prints every N steps")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"[rank {rank}] pid {os.getpid()} world {world} "
          f"restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", flush=True)

    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    path = os.path.join(args.checkpoint_dir, "checkpoint.pt")
    start = 0
    if os.path.exists(path):
        state = torch.load(path)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"[rank {rank}] resumed from step {start}", flush=True)

    w_true = torch.randn(32, 1, generator=torch.Generator().manual_seed(1234))
    loss = torch.tensor(0.0)
    for step in range(start, args.steps):
        batch = torch.Generator().manual_seed(step * 1000 + rank)
        x = torch.randn(64, 32, generator=batch)
        loss = torch.nn.functional.mse_loss(model(x), x @ w_true)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % args.checkpoint_every == 0:
            if rank == 0:
                os.makedirs(args.checkpoint_dir, exist_ok=True)
                torch.save({"model": model.module.state_dict(),
                            "optimizer": optimizer.state_dict(), "step": step + 1},
                           path + ".tmp")
                os.replace(path + ".tmp", path)
            dist.barrier()
        if rank == 0 and step % args.log_every == 0:
            print(f"step {step} loss {loss.item():.4f} world {world} t={time.time():.3f}",
                  flush=True)
        time.sleep(args.step_time)
    if rank == 0:
        print(f"done: {args.steps} steps, final loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
