#!/usr/bin/env bash
# The lmsgd demo on a fresh machine: installs packages if missing, builds, starts a local
# coordinator and 2 CPU workers, submits the shipped Fashion-MNIST job (ResNet-20, the paper's
# recipe scaled down) with lmsgdctl, follows it live until it ends (~8 minutes on 2 cores), then
# shows the result, the metrics and the checkpoint, and stops everything (--keep: leave the
# coordinator running).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
keep=0
[ "${1:-}" = "--keep" ] && keep=1

deploy/setup.sh
build_dir="${LMSGD_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build_dir" -j"$(nproc)" --target lmsgd-coordinator lmsgdctl lmsgd-worker
bin="$build_dir/coordinator"
ctl="$bin/ctl/lmsgdctl"

work="$(mktemp -d /tmp/lmsgd-demo.XXXXXX)"
echo "== starting lmsgd-coordinator (state in $work/state, log $work/coordinator.log)"
"$bin/lmsgd-coordinator" --listen 127.0.0.1:0 --metrics_listen 127.0.0.1:0 \
  --state_dir "$work/state" --ready_file "$work/ready" >"$work/coordinator.log" 2>&1 &
pid=$!
workers=()
cleanup() {
  for w in "${workers[@]}"; do kill -TERM "$w" 2>/dev/null || true; done
  if [ "$keep" = 0 ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
}
trap cleanup EXIT
for _ in $(seq 1 100); do [ -f "$work/ready" ] && break; sleep 0.1; done
[ -f "$work/ready" ] || { echo "coordinator did not start:"; cat "$work/coordinator.log"; exit 1; }
addr=$(sed -n 's/^grpc=//p' "$work/ready")
metrics=$(sed -n 's/^metrics=//p' "$work/ready")
export LMSGD_COORDINATOR="$addr"
echo "   gRPC on $addr, metrics on http://$metrics/metrics"

echo "== lmsgdctl submit deploy/jobs/fashion_mnist_resnet20.textproto"
job=$("$ctl" submit deploy/jobs/fashion_mnist_resnet20.textproto)
echo "$job"
# Fresh checkpoints for this run (the job file names the directory).
rm -rf /tmp/lmsgd-checkpoints/fashion-mnist-resnet20
threads=$(( $(nproc) / 2 )); [ "$threads" -ge 1 ] || threads=1
for d in 0 1; do
  echo "== starting lmsgd-worker $d ($threads threads, log $work/worker$d.log)"
  "$build_dir/worker/lmsgd-worker" --coordinator "$addr" --job "$job" --local_device "$d" \
    --threads "$threads" >"$work/worker$d.log" 2>&1 &
  workers+=($!)
done
echo "== lmsgdctl watch $job   (live progress; the job takes about 8 minutes on 2 cores)"
"$ctl" watch "$job" || true
echo "== lmsgdctl status $job"
"$ctl" status "$job"
echo "== per-epoch log of rank 0"
grep "epoch" "$work/worker0.log" || true
echo "== curl http://$metrics/metrics | grep lmsgd_coordinator_job"
curl -fsS "http://$metrics/metrics" | grep -E '^lmsgd_coordinator_(jobs|job_)' | head -20
for w in "${workers[@]}"; do wait "$w" 2>/dev/null || true; done
echo
echo "Checkpoints: /tmp/lmsgd-checkpoints/fashion-mnist-resnet20 (safetensors, torchvision names)."
echo "Logs: $work (coordinator.log, worker0.log, worker1.log)."
if [ "$keep" = 1 ]; then
  echo "Coordinator left running (pid $pid): export LMSGD_COORDINATOR=$addr; stop it with: kill $pid"
else
  echo "Stopping the coordinator; its state stays in $work/state (restart with --state_dir to resume)."
fi
