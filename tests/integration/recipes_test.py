#!/usr/bin/python3
"""docker/'s images and cluster recipes, checked where there is no Docker, Kubernetes or Slurm.

- Each Dockerfile is on CI's distribution (Debian 12) and builds through docker/install-rally, which
  uses the scripts CI runs (scripts/install-deps, the default CMake preset) and copies only build
  outputs that exist.
- The Kubernetes manifest parses; its rally command lines parse (rally ... --print-config, after
  Kubernetes' $(VAR) substitution); the workers' --rdzv-endpoint names the coordinator's Service
  and port; the coordinator listens on that port; every secret key the pods read is the same one;
  the Job runs as many pods as --nnodes allows at most.
- docker/install-rally and the Slurm script pass bash -n and shellcheck; the Slurm script's rally
  command line parses.

Usage: recipes_test.py SOURCE_DIR RALLY_BINARY BUILD_DIR. Prints one line per check and ends with
"recipes: N checks, M failed"; exits 1 if any failed.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import yaml

SOURCE, RALLY, BUILD = sys.argv[1], sys.argv[2], sys.argv[3]
checks = 0
failed = 0


def check(ok, what, detail=""):
    global checks, failed
    checks += 1
    if not ok:
        failed += 1
    print(("ok     " if ok else "FAILED ") + what + (f": {detail}" if detail and not ok else ""))


def parses(subcommand, args, what):
    """rally SUBCOMMAND --print-config ARGS exits 0 (every option known and valid). On a machine
    without GPUs, --nproc-per-node gpu (one worker per GPU) is parsed as 8."""
    args = list(args)
    if not os.path.exists("/dev/nvidia0"):
        args = ["8" if a == "gpu" and i > 0 and args[i - 1] == "--nproc-per-node" else a
                for i, a in enumerate(args)]
    r = subprocess.run([RALLY, subcommand, "--print-config", *args], capture_output=True,
                       text=True, timeout=60)
    check(r.returncode == 0, f"{what}: rally {subcommand} options parse",
          (r.stderr or r.stdout).strip()[:300])
    return r.stdout


def rally_args(words, subcommand):
    """The arguments after `rally SUBCOMMAND` in a list of words, or None."""
    for i in range(len(words) - 1):
        if os.path.basename(words[i]) == "rally" and words[i + 1] == subcommand:
            return words[i + 2:]
    return None


def option(args, name):
    return args[args.index(name) + 1] if name in args else None


# ---- Images -----------------------------------------------------------------------------------
install = os.path.join(SOURCE, "docker", "install-rally")
install_text = open(install).read()
check("scripts/install-deps" in install_text, "images: install with scripts/install-deps")
check("cmake --preset default" in install_text and "cmake --build --preset default" in install_text,
      "images: build with the default preset, as scripts/test")
check("scripts/test" in install_text, "images: can run scripts/test (RUN_TESTS=1)")
for produced in sorted(set(re.findall(r"build/default/([\w/.-]+\w)\b(?!/)", install_text))):
    exists = os.path.exists(os.path.join(BUILD, produced))
    guarded = f"-x build/default/{produced}" in install_text
    check(exists or guarded, f"images: copy build/default/{produced}", "no such build output")
for program in re.findall(r"for program in ([\w ]+); do", install_text)[0].split():
    check(os.path.exists(os.path.join(BUILD, "examples", program)) or program == "gpt",
          f"images: the example {program} is built (gpt only with libtorch)")
for source in re.findall(r"cp -r (examples/[\w/.-]+)", install_text):
    check(os.path.exists(os.path.join(SOURCE, source)), f"images: copy {source}")
for kind, extra in (("cpu", ""), ("cuda", " --require-cuda")):
    text = open(os.path.join(SOURCE, "docker", kind, "Dockerfile")).read()
    check(re.search(r"^FROM debian:12\b", text, re.M) is not None,
          f"{kind} image: on Debian 12, as CI")
    check(re.search(r"^RUN docker/install-rally" + re.escape(extra) + "$", text, re.M) is not None,
          f"{kind} image: RUN docker/install-rally{extra}")

# ---- Kubernetes ---------------------------------------------------------------------------------
manifest = os.path.join(SOURCE, "docker", "k8s", "rally-job.yaml")
docs = [d for d in yaml.safe_load_all(open(manifest)) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
check({"Service", "Deployment", "Job"} <= set(by_kind), "k8s: a Service, a Deployment and a Job",
      f"kinds {sorted(by_kind)}")

service = by_kind["Service"][0]
service_port = service["spec"]["ports"][0]["port"]
coordinator = by_kind["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
coordinator_args = rally_args(coordinator["command"] + coordinator.get("args", []), "coordinator")
check(coordinator_args is not None, "k8s: the Deployment runs rally coordinator")
if coordinator_args is not None:
    parses("coordinator", coordinator_args, "k8s coordinator")
    check(str(option(coordinator_args, "--port")) == str(service_port),
          "k8s: the coordinator listens on the Service's port",
          f"--port {option(coordinator_args, '--port')}, Service port {service_port}")

job = by_kind["Job"][0]
pod = job["spec"]["template"]["spec"]
trainer = pod["containers"][0]
# Kubernetes expands $(NAME) from the container's env before the shell sees it.
env_names = {e["name"] for e in trainer.get("env", [])}
placeholders = {"POD_NAME": "rally-job-0-abcde", "POD_IP": "10.0.0.7"}
words = trainer["command"] + trainer.get("args", [])
script = " ".join(words[2:]) if words[:2] == ["/bin/bash", "-c"] else None
if script is not None:
    for name in re.findall(r"\$\((\w+)\)", script):
        check(name in env_names, f"k8s: $({name}) is set in the trainer's env")
        script = script.replace(f"$({name})", placeholders.get(name, "x"))
    words = shlex.split(script)
run_args = rally_args(words, "run")
check(run_args is not None, "k8s: the Job runs rally run")
if run_args is not None:
    config = parses("run", run_args, "k8s trainer")
    endpoint = option(run_args, "--rdzv-endpoint") or ""
    check(endpoint == f"{service['metadata']['name']}:{service_port}",
          "k8s: the workers' --rdzv-endpoint is the coordinator's Service", endpoint)
    nnodes = option(run_args, "--nnodes") or "1"
    most = int(nnodes.split(":")[-1])
    check(job["spec"]["parallelism"] == most and job["spec"]["completions"] == most,
          "k8s: the Job runs --nnodes' MAX pods",
          f"parallelism {job['spec']['parallelism']}, --nnodes {nnodes}")
    check(option(coordinator_args or [], "--nnodes") == nnodes,
          "k8s: the coordinator and the workers agree on --nnodes")
    check(option(coordinator_args or [], "--job-id") == option(run_args, "--rdzv-id"),
          "k8s: the coordinator's --job-id is the workers' --rdzv-id")
    least = int(nnodes.split(":")[0])
    rules = job["spec"].get("successPolicy", {}).get("rules", [])
    check([r.get("succeededCount") for r in rules] == [least],
          "k8s: the Job succeeds once --nnodes' MIN pods have", str(rules))
    for path_option in ("--checkpoint-dir", "--events"):
        value = option(run_args, path_option)
        if value is not None:
            check(any(value.startswith(m["mountPath"] + "/") for m in trainer["volumeMounts"]),
                  f"k8s: {path_option} is on a mounted volume", value)
    check("recovery             in-place" in config, "k8s: in-place recovery")
secrets = []
for container in (coordinator, trainer):
    refs = [(e["name"], e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if e.get("valueFrom", {}).get("secretKeyRef")]
    check([r[0] for r in refs] == ["RALLY_TOKEN"],
          f"k8s: {container['name']} reads RALLY_TOKEN from a secret", str(refs))
    secrets.extend(refs)
check(len(set(secrets)) == 1, "k8s: the coordinator and the workers read the same secret",
      str(secrets))
mounts = {m["name"] for m in trainer.get("volumeMounts", [])}
check(mounts <= {v["name"] for v in pod.get("volumes", [])}, "k8s: every volume mount has a volume")

# ---- Shell scripts ------------------------------------------------------------------------------
sbatch = os.path.join(SOURCE, "docker", "slurm", "rally.sbatch")
shellcheck = shutil.which("shellcheck")
check(shellcheck is not None, "shellcheck is installed (scripts/install-deps)")
for script in (install, sbatch):
    name = os.path.relpath(script, SOURCE)
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    check(r.returncode == 0, f"{name}: bash -n", r.stderr.strip())
    if shellcheck:
        r = subprocess.run([shellcheck, "-S", "warning", script], capture_output=True, text=True)
        check(r.returncode == 0, f"{name}: shellcheck -S warning", r.stdout.strip()[:500])

# ---- Slurm --------------------------------------------------------------------------------------
text = open(sbatch).read().replace("\\\n", " ")
line = next((l for l in text.splitlines() if re.search(r"\brally run\b", l)
             and not l.lstrip().startswith("#")), None)
check(line is not None, "slurm: the script runs rally run")
if line is not None:
    values = {"MIN_NODES": "2", "SLURM_NNODES": "4", "endpoints": "node001:29400,node002:29400,node003:29400", "PORT": "29400",
              "SLURM_JOB_ID": "1234", "checkpoints": "/scratch/ckpt"}
    line = line.replace('${container[@]+"${container[@]}"}', "")
    for name in re.findall(r"\$\{?(\w+)\}?", line):
        check(name in values, f"slurm: ${name} has a test value")
        line = re.sub(r"\$\{?" + name + r"\}?", values.get(name, "x"), line)
    args = rally_args(shlex.split(line), "run")
    parses("run", args, "slurm")
    check(option(args, "--rdzv-endpoint") == "node001:29400,node002:29400,node003:29400",
          "slurm: the first node's agent hosts the coordinator, the next two are standbys")
    # The list as the script builds it, from a node list of 4 given by a stand-in scontrol.
    build = next((l for l in open(sbatch).read().splitlines() if l.startswith("endpoints=")), None)
    check(build is not None, "slurm: the script builds the endpoint list")
    if build is not None:
        with tempfile.TemporaryDirectory() as fake:
            scontrol = os.path.join(fake, "scontrol")
            with open(scontrol, "w") as f:
                f.write("#!/bin/sh\nprintf 'n1\\nn2\\nn3\\nn4\\n'\n")
            os.chmod(scontrol, 0o755)
            r = subprocess.run(["bash", "-c", f'PORT=29400; {build}; echo "$endpoints"'],
                               capture_output=True, text=True,
                               env={**os.environ, "PATH": fake + ":" + os.environ["PATH"]})
            check(r.stdout.strip() == "n1:29400,n2:29400,n3:29400",
                  "slurm: the endpoint list is the first 3 nodes", r.stdout + r.stderr)

print(f"recipes: {checks} checks, {failed} failed")
sys.exit(1 if failed else 0)
