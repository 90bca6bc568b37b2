#!/usr/bin/python3
"""In-place recovery under `rally run --recovery in-place`, beside torchrun's restart path.

rally: examples/minimal (data-parallel regression with librally: World, ElasticState,
ElasticSampler, ElasticRun), 2 nodes x 2 workers on loopback, 20 ms per step, a commit every 5
steps. Each trial starts a fresh job, waits a random 1-2 s, then
  worker kill  kill -9 of one of the 4 workers, chosen at random (MIN = MAX: it is replaced);
  node loss    kill -9 of the second node's agent and its workers (--nnodes 1:2: the survivors
               go on with 2 ranks);
  host loss    kill -9 of the first node, whose agent hosts the job's coordinator (the nodes on
               127.0.0.1 and 127.0.0.2, --rdzv-endpoint naming both, --nnodes 1:2): the second
               node takes the coordinator over and its ranks go on with 2;
and measures the time from the kill to the completion of the first step after the recovery (the
"recovery" event that the lowest surviving rank writes to the event log once that step is done), and the
steps lost: steps begun before the failure that had been committed and yet run again, i.e.
steps_redone beyond the commit interval (0 when the newest commit was restored).

torchrun: the restart path of the same kind of job (examples/pytorch/train_ddp.py, gloo, 20 ms
per step, a checkpoint every 10 steps), kill -9 of a worker to the next completed step, as
bench/recovery/recovery_bench.py measures it (torchrun cannot run librally's in-place path).

Ends with
  inplace worker_kill_p50_ms=A node_loss_p50_ms=B host_loss_p50_ms=C steps_lost_max=L vs_torchrun=R
where R is torchrun's worker-kill p50 over rally's.

    /usr/bin/python3 bench/recovery/inplace_bench.py [--trials 20] [--torchrun-trials 5]
"""
import argparse
import datetime
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recovery_bench  # noqa: E402  (Job, free_port, the torchrun trial)

ROOT = recovery_bench.ROOT
COMMIT_EVERY = 5


def events(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def when(event):
    t = datetime.datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return t.replace(tzinfo=datetime.timezone.utc).timestamp()


def wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.005)
    raise RuntimeError(f"timed out waiting for {what}")


def inplace_trial(rally, minimal, mode):
    ev = tempfile.mktemp(prefix="rally-inplace-events-")
    port = recovery_bench.free_port()
    # host: the coordinator's host is lost; the second node, a standby address, takes it over.
    endpoint = f"127.0.0.1:{port},127.0.0.2:{port}" if mode == "host" else f"127.0.0.1:{port}"
    common = [rally, "run", "--nproc-per-node", "2", "--recovery", "in-place",
              "--max-restarts", "50", "--log-level", "warn", "--events", ev,
              "--nnodes", "2" if mode == "worker" else "1:2", "--rdzv-endpoint", endpoint,
              "--rdzv-id", "bench-inplace"]
    program = [minimal, "--samples", "1000000", "--epochs", "1", "--batch", "8",
               "--commit-every", str(COMMIT_EVERY), "--step-ms", "20"]
    env = dict(os.environ, RALLY_TOKEN="bench")
    a = recovery_bench.Job(common + ["--node-id", "a", "--local-addr", "127.0.0.1"] + program, env)
    time.sleep(0.3)
    b = recovery_bench.Job(common + ["--node-id", "b", "--local-addr",
                                     "127.0.0.2" if mode == "host" else "127.0.0.1"] + program, env)
    try:
        started = wait_for(
            lambda: [e for e in events(ev) if e.get("event") == "workers_started"]
            if len([e for e in events(ev) if e.get("event") == "workers_started"]) >= 2 else None,
            60, "both nodes' workers")
        time.sleep(random.uniform(1.0, 2.0))
        if mode == "worker":
            victim = random.choice([p for e in started for p in e["pids"]])
            t_kill = time.time()
            os.kill(victim, signal.SIGKILL)
        elif mode == "node":
            t_kill = time.time()
            b.kill_tree()
        else:
            t_kill = time.time()
            a.kill_tree()
        try:
            rec = wait_for(lambda: next((e for e in events(ev) if e.get("event") == "recovery"
                                         and when(e) > t_kill), None), 60, "the recovery event")
        except RuntimeError:
            raise RuntimeError(f"{mode} kill: no recovery within 60 s\n-- node a:\n"
                               + "".join(a.lines[-25:]) + "-- node b:\n" + "".join(b.lines[-25:])
                               + "-- events:\n" + "\n".join(json.dumps(e) for e in events(ev)))
        redone = rec.get("steps_redone", 0)
        return (when(rec) - t_kill) * 1000, max(0, redone - (COMMIT_EVERY - 1)), rec
    finally:
        a.stop()
        b.stop()
        try:
            os.unlink(ev)
        except OSError:
            pass


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rally", default=os.path.join(ROOT, "build/default/launcher/rally"))
    ap.add_argument("--minimal", default=os.path.join(ROOT, "build/default/examples/minimal"))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--torchrun-trials", type=int, default=5)
    ap.add_argument("--modes", default="worker,node,host",
                    help="what is killed: worker, node, host (the coordinator's), comma-separated")
    args = ap.parse_args()
    results = {}
    for mode in args.modes.split(","):
        times, lost, phases = [], [], []
        for i in range(args.trials):
            ms, l, rec = inplace_trial(args.rally, args.minimal, mode)
            times.append(ms)
            lost.append(l)
            phases.append(rec["phases_ms"])
            print(f"  rally in place  {mode:6} kill -> next step {ms:7.1f} ms  steps redone "
                  f"{rec.get('steps_redone', 0)}  world {rec['world_size']}  phases "
                  + " ".join(f"{k}={v:.1f}" for k, v in rec["phases_ms"].items()), flush=True)
        results[mode] = (times, lost, phases)
    torch_kills = []
    if os.path.exists("/usr/bin/torchrun"):
        for _ in range(args.torchrun_trials):
            _, kill = recovery_bench.trial_cold_and_worker_kill("torchrun", args.rally, [])
            torch_kills.append(kill * 1000)
            print(f"  torchrun restart worker kill -> next step {kill * 1000:7.1f} ms", flush=True)
    print(f"\n# {args.trials} trials each; {os.cpu_count()} cores; ms from kill -9 to the next "
          "completed step")
    print(f"# {'case':24} {'p50_ms':>8} {'p99_ms':>8} {'max_ms':>8} {'steps_lost_max':>14}")
    for mode, label in (("worker", "rally in place, worker"), ("node", "rally in place, node"),
                        ("host", "rally in place, host")):
        if mode not in results:
            continue
        t, l, _ = results[mode]
        print(f"  {label:24} {pct(t, 50):8.1f} {pct(t, 99):8.1f} {max(t):8.1f} {max(l):14d}")
    if torch_kills:
        print(f"  {'torchrun restart, worker':24} {pct(torch_kills, 50):8.1f} "
              f"{pct(torch_kills, 99):8.1f} {max(torch_kills):8.1f} {'(checkpoint)':>14}")
    for mode in results:
        keys = results[mode][2][0].keys()
        med = {k: statistics.median(p.get(k, 0) for p in results[mode][2]) for k in keys}
        print(f"# median phases, {mode}: " + " ".join(f"{k}={v:.1f}" for k, v in med.items()))
    p50 = {m: pct(results[m][0], 50) if m in results else float("nan")
           for m in ("worker", "node", "host")}
    lost = max(max(r[1]) for r in results.values())
    ratio = pct(torch_kills, 50) / p50["worker"] if torch_kills else float("nan")
    print(f"inplace worker_kill_p50_ms={p50['worker']:.1f} node_loss_p50_ms={p50['node']:.1f} "
          f"host_loss_p50_ms={p50['host']:.1f} steps_lost_max={lost} vs_torchrun={ratio:.1f}")


if __name__ == "__main__":
    main()
