#!/usr/bin/python3
"""Recovery of one PyTorch DDP job under `rally run` and under torchrun, side by side, in one run.

The job is examples/pytorch/train_ddp.py (gloo, checkpoint every 10 steps, 20 ms per step); rank 0
prints every step. For each launcher:
  cold start   launch (1 node, 2 workers) to the first completed step;
  worker kill  kill -9 of rank 1 at a random time to the next completed step;
  node loss    2 nodes x 1 worker (the first hosts the rendezvous), kill -9 of the second node's
               agent and worker at a random time to the survivor's next completed step;
  agent RSS    the launcher's resident memory while the job runs.
Medians over --trials. Ends with
  recovery worker_kill_ratio=R node_loss_ratio=Q cold_start_ratio=C     (rally / torchrun)

    /usr/bin/python3 bench/recovery/recovery_bench.py --rally build/default/launcher/rally
Needs Debian's python3-torch (torch and /usr/bin/torchrun).
"""
import argparse
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "pytorch", "train_ddp.py")
# Steps are timed by the time the worker stamped on the line, not by when the line arrived: torchrun's
# --tee tails a log file, so its lines arrive late and in batches.
STEP = re.compile(r"step (\d+) loss .* t=([0-9.]+)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """One launcher process; records when each step completed (from its output)."""

    def __init__(self, argv, env=None):
        self.steps = []  # (time, step)
        self.lines = []
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, text=True, start_new_session=True)
        self.started = time.time()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = STEP.search(line)
            if m:
                self.steps.append((float(m.group(2)), int(m.group(1))))

    def wait_step_after(self, t, timeout):
        """The completion time of the first step that completed after `t`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for when, _ in list(self.steps):
                if when > t:
                    return when
            time.sleep(0.005)
        return None

    def worker_pid(self, rank):
        pat = re.compile(rf"\[rank {rank}\] pid (\d+)")
        for line in reversed(self.lines):
            m = pat.search(line)
            if m:
                return int(m.group(1))
        return None

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def kill_tree(self):
        """kill -9 the launcher and every process under it (a whole node)."""
        victims = descendants(self.proc.pid) + [self.proc.pid]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def descendants(pid):
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def launcher_argv(kind, rally, nnodes, nproc, endpoint, node, ckpt, steps):
    script = [SCRIPT, "--steps", str(steps), "--step-time", "0.02", "--log-every", "1",
              "--checkpoint-every", "10", "--checkpoint-dir", ckpt]
    if kind == "rally":
        argv = [rally, "run", "--nproc-per-node", str(nproc), "--max-restarts", "5",
                "--log-level", "warn"]
        if nnodes > 1:
            argv += ["--nnodes", f"1:{nnodes}", "--rdzv-endpoint", endpoint, "--rdzv-id", "bench",
                     "--node-id", node, "--local-addr", "127.0.0.1", "--last-call", "30s"]
        return argv + script
    argv = ["/usr/bin/torchrun", "--nproc_per_node", str(nproc), "--max_restarts", "5",
            "--redirects", "1", "--tee", "1"]  # torchrun 1.13 crashes on Python 3.11 without these
    if nnodes > 1:
        argv += ["--nnodes", f"1:{nnodes}", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                 "--rdzv_id", "bench"]
    else:
        argv += ["--standalone"]
    return argv + script


def env_for(kind):
    env = dict(os.environ, PYTHON_EXEC="/usr/bin/python3", RALLY_TOKEN="bench",
               LOGLEVEL="WARNING")
    return env


def trial_cold_and_worker_kill(kind, rally, rss_samples):
    ckpt = tempfile.mkdtemp(prefix="rally-bench-ckpt-")
    job = Job(launcher_argv(kind, rally, 1, 2, None, "n0", ckpt, 100000), env_for(kind))
    first = job.wait_step_after(0, 120)
    if first is None:
        job.stop()
        raise RuntimeError(f"{kind}: no step within 120 s:\n" + "".join(job.lines[-20:]))
    cold = first - job.started
    time.sleep(random.uniform(1.0, 2.0))
    rss_samples.append(job.rss_mib())
    pid = job.worker_pid(1)
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    nxt = job.wait_step_after(t_kill, 120)
    job.stop()
    if nxt is None:
        raise RuntimeError(f"{kind}: no step after the worker kill:\n" + "".join(job.lines[-20:]))
    return cold, nxt - t_kill


def trial_node_loss(kind, rally):
    ckpt = tempfile.mkdtemp(prefix="rally-bench-ckpt-")
    endpoint = f"127.0.0.1:{free_port()}"
    a = Job(launcher_argv(kind, rally, 2, 1, endpoint, "a", ckpt, 100000), env_for(kind))
    time.sleep(1.0)  # let the first node host the rendezvous
    b = Job(launcher_argv(kind, rally, 2, 1, endpoint, "b", ckpt, 100000), env_for(kind))
    try:
        if a.wait_step_after(0, 180) is None:
            raise RuntimeError(f"{kind}: two nodes never stepped:\n" + "".join(a.lines[-20:]))
        time.sleep(random.uniform(1.0, 2.0))
        t_kill = time.time()
        b.kill_tree()
        nxt = a.wait_step_after(t_kill, 240)
        if nxt is None:
            raise RuntimeError(f"{kind}: the survivor never stepped again:\n" + "".join(a.lines[-20:]))
        return nxt - t_kill
    finally:
        a.stop()
        b.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rally", default=os.path.join(ROOT, "build/default/launcher/rally"))
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    results = {}
    for kind in ("rally", "torchrun"):
        colds, kills, losses, rss = [], [], [], []
        for _ in range(args.trials):
            cold, kill = trial_cold_and_worker_kill(kind, args.rally, rss)
            colds.append(cold)
            kills.append(kill)
            print(f"  {kind:8} cold start {cold:6.2f} s   worker kill -> next step {kill:6.2f} s",
                  flush=True)
        for _ in range(args.trials):
            loss = trial_node_loss(kind, args.rally)
            losses.append(loss)
            print(f"  {kind:8} node loss -> survivor's next step {loss:6.2f} s", flush=True)
        results[kind] = {k: statistics.median(v) for k, v in
                         (("cold", colds), ("kill", kills), ("loss", losses), ("rss", rss))}
    print(f"\n# medians of {args.trials} trials; 2 cores; PyTorch {__import__('torch').__version__}")
    print(f"# {'launcher':9} {'cold_start_s':>12} {'worker_kill_s':>13} {'node_loss_s':>11} "
          f"{'agent_rss_MiB':>13}")
    for kind, r in results.items():
        print(f"  {kind:9} {r['cold']:12.2f} {r['kill']:13.2f} {r['loss']:11.2f} {r['rss']:13.1f}")
    r, t = results["rally"], results["torchrun"]
    print(f"recovery worker_kill_ratio={r['kill'] / t['kill']:.3f} "
          f"node_loss_ratio={r['loss'] / t['loss']:.3f} cold_start_ratio={r['cold'] / t['cold']:.3f}")


if __name__ == "__main__":
    main()
