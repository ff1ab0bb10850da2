#!/usr/bin/python3
"""Validates deploy/: Kubernetes manifests (parsed; required fields; cross-references between the
Service, StatefulSet, Job, PVC and Secrets; the coordinator address the workers use), the flags that
manifests, systemd units and the Slurm script pass to lmsgd binaries (each must be a flag the
binary defines), and the scripts' shell syntax. Exit 0: valid; 1: problems (listed); 77: skipped
(python3-yaml missing).

Usage: validate_deploy.py SOURCE_DIR
"""
import os
import re
import subprocess
import sys

try:
    import yaml
except ImportError:
    print("SKIP: python3-yaml is not installed (deploy/setup.sh installs it)")
    sys.exit(77)

src = sys.argv[1]
problems = []


def need(cond, what):
    if not cond:
        problems.append(what)


def flags_of(main_cc):
    text = open(os.path.join(src, main_cc)).read()
    return set(re.findall(r"ABSL_FLAG\([^,]+,\s*(\w+)", text))


FLAGS = {
    "lmsgd-coordinator": flags_of("coordinator/main.cc"),
    "lmsgd-worker": flags_of("worker/main.cc"),
}


def check_flags(binary, args, where):
    for a in args:
        m = re.match(r"--(\w+)", a)
        if m:
            need(m.group(1) in FLAGS[binary], f"{where}: {binary} has no flag --{m.group(1)}")


def load(name):
    with open(os.path.join(src, "deploy/k8s", name)) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for d in docs:
        for field in ("apiVersion", "kind", "metadata"):
            need(field in d, f"{name}: a document lacks {field}")
        need("name" in d.get("metadata", {}), f"{name}: {d.get('kind')} lacks metadata.name")
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


coord = load("coordinator.yaml")
workers = load("workers.yaml")
svc = coord.get(("Service", "lmsgd-coordinator"))
sts = coord.get(("StatefulSet", "lmsgd-coordinator"))
job = workers.get(("Job", "lmsgd-workers"))
pvc = workers.get(("PersistentVolumeClaim", "lmsgd-checkpoints"))
need(svc and sts and job and pvc, "k8s: expected Service+StatefulSet lmsgd-coordinator, Job lmsgd-workers, PVC lmsgd-checkpoints")
secrets_documented = set(re.findall(r"create secret generic ([\w-]+)",
                                    open(os.path.join(src, "deploy/k8s/coordinator.yaml")).read()))


def pod_checks(spec, name):
    tmpl = spec["template"]
    ann = tmpl["metadata"].get("annotations", {})
    need(ann.get("prometheus.io/scrape") == "true", f"{name}: no prometheus.io/scrape annotation")
    ports = {p["containerPort"] for c in tmpl["spec"]["containers"] for p in c.get("ports", [])}
    need(int(ann.get("prometheus.io/port", 0)) in ports, f"{name}: prometheus.io/port is not a container port")
    for v in tmpl["spec"].get("volumes", []):
        if "secret" in v:
            need(v["secret"]["secretName"] in secrets_documented,
                 f"{name}: secret {v['secret']['secretName']} is not documented in coordinator.yaml")
    mounts = {m["name"] for c in tmpl["spec"]["containers"] for m in c.get("volumeMounts", [])}
    declared = {v["name"] for v in tmpl["spec"].get("volumes", [])} | {
        t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    need(mounts <= declared, f"{name}: mounts {sorted(mounts - declared)} have no volume")
    return tmpl


if svc and sts and job and pvc:
    # Service <-> StatefulSet.
    need(sts["spec"]["serviceName"] == svc["metadata"]["name"], "StatefulSet.serviceName is not the Service")
    ct = pod_checks(sts["spec"], "coordinator")
    labels = ct["metadata"]["labels"]
    need(all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "Service selector misses the pods")
    need(sts["spec"]["selector"]["matchLabels"].items() <= labels.items(), "StatefulSet selector misses its pods")
    cports = {p["name"]: p["containerPort"] for c in ct["spec"]["containers"] for p in c.get("ports", [])}
    for p in svc["spec"]["ports"]:
        need(p["targetPort"] in cports, f"Service port {p['name']} targets no container port")
    c0 = ct["spec"]["containers"][0]
    check_flags("lmsgd-coordinator", c0["args"], "coordinator.yaml")
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    listen = next(a for a in c0["args"] if a.startswith("--listen="))
    need(listen.endswith(f":{cports['grpc']}"), "coordinator --listen does not match its grpc container port")
    # Job <-> Service, PVC.
    js = job["spec"]
    need(js.get("completionMode") == "Indexed", "workers: not an Indexed Job")
    need(js.get("parallelism") == js.get("completions"), "workers: parallelism != completions")
    wt = pod_checks(js, "workers")
    w0 = wt["spec"]["containers"][0]
    check_flags("lmsgd-worker", w0["args"], "workers.yaml")
    coord_arg = next((a for a in w0["args"] if a.startswith("--coordinator=")), "")
    need(coord_arg == f"--coordinator={svc['metadata']['name']}:{grpc_port}",
         f"workers: {coord_arg} is not the coordinator Service's gRPC address")
    need("nvidia.com/gpu" in w0.get("resources", {}).get("limits", {}), "workers: no nvidia.com/gpu request")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in wt["spec"]["volumes"] if "persistentVolumeClaim" in v}
    need(pvc["metadata"]["name"] in claims, "workers: the checkpoint PVC is not mounted")

# systemd units and the Slurm script: the flags they pass.
for unit, binary in (("lmsgd-coordinator.service", "lmsgd-coordinator"), ("lmsgd-worker@.service", "lmsgd-worker")):
    text = open(os.path.join(src, "deploy/systemd", unit)).read()
    for section in ("[Unit]", "[Service]", "[Install]"):
        need(section in text, f"{unit}: no {section}")
    need(f"/usr/local/bin/{binary}" in text, f"{unit}: does not run {binary}")
    exec_start = re.search(r"^ExecStart=((?:.*\\\n)*.*)$", text, re.M)
    need(exec_start is not None, f"{unit}: no ExecStart")
    if exec_start:
        check_flags(binary, re.findall(r"--\w+", exec_start.group(1)), unit)
sbatch = os.path.join(src, "deploy/slurm/lmsgd.sbatch")
text = open(sbatch).read()
for binary in ("lmsgd-coordinator", "lmsgd-worker"):
    for line in text.splitlines():
        if binary in line and "--" in line:
            check_flags(binary, [f for f in re.findall(r"--\w+", line) if not f.startswith("--overlap")], "lmsgd.sbatch")
for script in ("deploy/slurm/lmsgd.sbatch", "deploy/demo.sh", "deploy/setup.sh", "deploy/test.sh"):
    r = subprocess.run(["bash", "-n", os.path.join(src, script)], capture_output=True, text=True)
    need(r.returncode == 0, f"{script}: shell syntax: {r.stderr.strip()}")

if problems:
    print("\n".join("PROBLEM: " + p for p in problems))
    sys.exit(1)
print("deploy/ valid: k8s (coordinator, workers), systemd, slurm, scripts")
