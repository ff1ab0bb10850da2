#!/usr/bin/env bash
# The lmsgd demo on a fresh machine: installs packages if missing, builds, starts a local
# coordinator, submits the shipped Fashion-MNIST job with lmsgdctl, shows its status and
# metrics, then stops the coordinator (kept running with --keep).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
keep=0
[ "${1:-}" = "--keep" ] && keep=1

deploy/setup.sh
build_dir="${LMSGD_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build_dir" -j"$(nproc)" --target lmsgd-coordinator lmsgdctl
bin="$build_dir/coordinator"
ctl="$bin/ctl/lmsgdctl"

work="$(mktemp -d /tmp/lmsgd-demo.XXXXXX)"
echo "== starting lmsgd-coordinator (state in $work/state, log $work/coordinator.log)"
"$bin/lmsgd-coordinator" --listen 127.0.0.1:0 --metrics_listen 127.0.0.1:0 \
  --state_dir "$work/state" --ready_file "$work/ready" >"$work/coordinator.log" 2>&1 &
pid=$!
cleanup() { if [ "$keep" = 0 ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi; }
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
echo "== lmsgdctl status $job"
"$ctl" status "$job"
echo "== lmsgdctl list"
"$ctl" list
echo "== curl http://$metrics/metrics | grep lmsgd_coordinator_jobs"
curl -fsS "http://$metrics/metrics" | grep '^lmsgd_coordinator_jobs{'
echo
echo "The job waits for 2 workers (lmsgd-worker arrives with the training engine)."
if [ "$keep" = 1 ]; then
  echo "Coordinator left running (pid $pid): export LMSGD_COORDINATOR=$addr; stop it with: kill $pid"
else
  echo "Stopping the coordinator; its state stays in $work/state (restart with --state_dir to resume)."
fi
