"""PyTorch's Python DDP (gloo) on the same models, batch and step as ddp_bench.cc; launched by
bench/ddp/run through rally run (torchrun-compatible). Prints (rank 0)
"model M step_ms X" with X the median step."""
import argparse, math, time
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(512, 2048), nn.Linear(2048, 2048), nn.Linear(2048, 512)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class Block(nn.Module):  # as examples/gpt/gpt_model.h at TP degree 1
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj, self.up, self.down = nn.Linear(dim, dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, T, _ = x.shape
        h = self.ln1(x)
        split = lambda t: t.view(B, T, self.heads, self.hd).transpose(1, 2).reshape(B * self.heads, T, self.hd)
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        causal = torch.full((T, T), float("-inf")).triu(1)
        att = torch.softmax(torch.baddbmm(causal, q, k.transpose(1, 2), alpha=1 / math.sqrt(self.hd)), -1)
        y = (att @ v).view(B, self.heads, T, self.hd).transpose(1, 2).reshape(B, T, self.heads * self.hd)
        x1 = x + self.proj(y)
        return x1 + self.down(F.gelu(self.up(self.ln2(x1))))


class Gpt(nn.Module):
    def __init__(self, vocab=256, context=64, dim=96, heads=4, layers=3):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.tokens(ids) + self.positions[: ids.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mlp")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ddp", type=int, default=1, help="0: plain local training, no DDP")
    p.add_argument("--bucket-view", type=int, default=0, help="1: gradient_as_bucket_view")
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(1)
    if a.model == "mlp":
        model = Mlp()
        x, y = torch.randn(a.batch, 512), torch.randn(a.batch, 512)
        loss_fn = lambda m: F.mse_loss(m(x), y)
    else:
        model = Gpt()
        x, y = torch.randint(0, 256, (a.batch, 64)), torch.randint(0, 256, (a.batch, 64))
        loss_fn = lambda m: F.cross_entropy(m(x).reshape(-1, 256), y.reshape(-1))
    ddp = (nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bool(a.bucket_view))
           if a.ddp else model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    times = []
    for s in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(ddp).backward()
        opt.step()
        if s >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    if dist.get_rank() == 0:
        print(f"model {a.model} step_ms {times[len(times) // 2]:.2f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
