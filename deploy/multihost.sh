#!/usr/bin/env bash
# Several "hosts" on one machine: Linux network namespaces joined by a bridge, each with its own
# address (deploy/netns.sh). The coordinator runs in host 0, two workers in each of hosts 1 and 2
# (ranks contiguous per host, hierarchical allreduce with one leader per host, UCX over TCP between
# the hosts), and a small synthetic job trains to success. With --cut, host 2's link goes down for a while after the
# first checkpoint: the loss is detected, the job re-forms when the link is back and resumes from
# the checkpoint. Needs root (ip netns); exits 77 ("skipped") when namespaces cannot be created.
#   deploy/multihost.sh [--cut]        (LMSGD_BUILD_DIR: build directory, default build)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${LMSGD_BUILD_DIR:-$root/build}"
cut=0
[ "${1:-}" = "--cut" ] && cut=1
tag="lm$$"
if [ "$(id -u)" != 0 ] || ! "$root/deploy/netns.sh" up "$tag" 3 10.77.0; then
  echo "SKIP: cannot create network namespaces (needs root and iproute2)"
  exit 77
fi
work="$(mktemp -d /tmp/lmsgd-multihost.XXXXXX)"
pids=()
cleanup() {
  exec 2>/dev/null  # not bash's "Killed" notices for the jobs below
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  # $! above is the background subshell running `ip netns exec`, not always the program itself:
  # netns.sh kills whatever still runs in the namespaces, or a coordinator outlives the test.
  "$root/deploy/netns.sh" down "$tag" 3
  wait 2>/dev/null || true
}
trap cleanup EXIT
in_host() { local h=$1; shift; ip netns exec "${tag}h$h" "$@"; }
coord="10.77.0.1:7070"
in_host 0 "$build/coordinator/lmsgd-coordinator" --listen "$coord" --metrics_listen= --state_dir "$work/state" \
  --ready_file "$work/ready" --heartbeat_interval 0.5s --heartbeat_timeout 4s >"$work/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [ -f "$work/ready" ] && break; sleep 0.1; done
[ -f "$work/ready" ] || { echo "coordinator did not start"; cat "$work/coordinator.log"; exit 1; }
ctl() { in_host 0 "$build/coordinator/ctl/lmsgdctl" --coordinator "$coord" "$@"; }
cat >"$work/job.textproto" <<JOB
name: "multihost"
model: MODEL_RESNET8
dataset { kind: DATASET_SYNTHETIC train_examples: 4096 val_examples: 256 num_classes: 10 image_size: 8 }
world_size: 4
per_worker_batch: 8
bn_group_size: 8
epochs: 4
base_lr: 0.1
reference_batch: 32
warmup_epochs: 1
lr_decay_epochs: [3]
allreduce: ALLREDUCE_HIERARCHICAL
collective_timeout_s: 4
checkpoint_dir: "$work/ckpt"
checkpoint_interval_epochs: 1
seed: 3
JOB
job=$(ctl submit "$work/job.textproto")
echo "job $job: coordinator on host 0 ($coord), 2 workers on each of hosts 1 and 2"
for h in 1 2; do
  for d in 0 1; do
    in_host "$h" "$build/worker/lmsgd-worker" --coordinator "$coord" --job "$job" --host "host$h" \
      --local_device "$d" --threads 1 --data_threads 1 >"$work/worker-h$h-$d.log" 2>&1 &
    pids+=($!)
  done
done
if [ "$cut" = 1 ]; then
  for _ in $(seq 1 600); do [ -f "$work/ckpt/LATEST" ] && break; sleep 0.1; done
  echo "cutting host 2's link (after $(cat "$work/ckpt/LATEST" 2>/dev/null))"
  in_host 2 ip link set eth0 down
  sleep 8
  in_host 2 ip link set eth0 up
  echo "host 2's link is back"
fi
state=""
for _ in $(seq 1 900); do
  state=$(ctl --output json status "$job" | sed -n 's/^ "state": "\(.*\)",$/\1/p')
  case "$state" in JOB_STATE_SUCCEEDED|JOB_STATE_FAILED|JOB_STATE_CANCELLED) break ;; esac
  sleep 0.2
done
ctl status "$job"
echo "ranks by host:"
grep -h "joined job" "$work"/worker-h*.log | sed 's/^/  /' | sort -u | head -8
if [ "$state" != JOB_STATE_SUCCEEDED ]; then
  echo "FAILED: job ended in '$state'; logs in $work"
  tail -5 "$work"/worker-h*.log
  trap - EXIT; cleanup; exit 1
fi
gen=$(ctl --output json status "$job" | sed -n 's/^ "generation": "\{0,1\}\([0-9]*\)"\{0,1\},$/\1/p')
if [ "$cut" = 1 ] && [ "${gen:-1}" -lt 2 ]; then
  echo "FAILED: the link cut did not re-form the job (generation ${gen:-?})"
  exit 1
fi
echo "OK: job succeeded across 3 network namespaces (generation ${gen:-?})"
trap - EXIT
cleanup
rm -rf "$work"
