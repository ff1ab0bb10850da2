#!/usr/bin/env bash
# The device-machine check (the GPU backend, NCCL at k = 1, and the CPU allreduce on the device machine's cores), in two halves.
#
#   deploy/gpu_check.sh --prepare
#       On the development machine (Debian, CUDA 13 + cuDNN 9 + NCCL, Abseil): builds the GPU
#       binaries, the coordinator, lmsgdctl and the allreduce benchmark (build-gpu/, Release) and
#       bundles them, stripped, with the shared libraries they need, UCX's modules and a relocatable
#       copy of Debian's Open MPI (the benchmark's baseline) into .gpu_bundle/bundle.tar.xz
#       (git-ignored; ~20 MB). The GPU machine has no Debian packages, so the bundle brings what it
#       lacks and uses its CUDA, cuDNN, cuBLAS and NCCL (the toolkit's and PyTorch's pip wheels).
#
#   deploy/gpu_check.sh [--quick] [--no-allreduce] [--out DIR]
#       On the GPU machine, in the repo root with .gpu_bundle/ carried along (--quick takes about
#       8 minutes on one H100 with 16 cores): the GPU unit tests (backend_cuda_test, comm_nccl_test, the GPU trainer tests of train_test),
#       a short standalone lmsgd-worker run on the GPU, the same job through a real coordinator
#       (lmsgdctl submit/watch; NCCL bootstrapped through the coordinator), the agreement table
#       (GPU vs the float64 reference, fp32 and bf16), ResNet-50 training throughput for lmsgd and for
#       PyTorch (torchvision resnet50, channels_last, autocast bf16) at batch 64/128/256 x
#       fp32/tf32/bf16 with one table of ratios, and last the CPU allreduce benchmark
#       (lmsgd-bench allreduce, k = 2 and 4 processes, lmsgd vs Gloo vs Open MPI, and lmsgd's ring
#       and halving/doubling over UCX's TCP transport up to 1 MiB; the communicator with 1, 2 and 4
#       lanes at k = 4) on the machine's cores. --quick: batch 128 and 256 in bf16 and fp32 only. --no-allreduce: skip the CPU
#       benchmark (ALLREDUCE_BUDGET_S: seconds of benchmark rounds, default 200). Results also go
#       to DIR (default $OUT or /tmp/gpu_check) as gpu_check.jsonl, gpu_check.log, dist_worker0.log,
#       allreduce.jsonl and allreduce_summary.txt.
#
# With the device tool: run(command="deploy/gpu_check.sh --quick", carry=[".gpu_bundle"], timeout_s=570).
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.gpu_bundle

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DLMSGD_WITH_CUDA=ON >/dev/null
  cmake --build build-gpu --target lmsgd-gpu-check backend_cuda_test comm_nccl_test train_test lmsgd-worker lmsgd-coordinator lmsgdctl \
    lmsgd-bench lmsgd-bench-mpi
  rm -rf "$BUNDLE"
  mkdir -p "$BUNDLE/bin" "$BUNDLE/lib"
  for b in build-gpu/tests/lmsgd-gpu-check build-gpu/tests/backend_cuda_test build-gpu/tests/comm_nccl_test \
           build-gpu/tests/train_test \
           build-gpu/worker/lmsgd-worker build-gpu/coordinator/lmsgd-coordinator build-gpu/coordinator/ctl/lmsgdctl \
           build-gpu/tests/lmsgd-bench build-gpu/tests/lmsgd-bench-mpi; do
    strip -o "$BUNDLE/bin/$(basename "$b")" "$b"
  done
  # copy_deps DEST EXCLUDE FILE...: the shared libraries FILEs load, except glibc, libstdc++/libgcc,
  # what matches EXCLUDE and what the bundle's lib/ already has, into DEST.
  copy_deps() {
    local dest=$1 exclude=$2
    shift 2
    for f in "$@"; do
      ldd "$f" 2>/dev/null | awk '/=>/ {print $3}' || true  # not every file is an ELF object
    done | sort -u | { grep -v -E "/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+)\.so|$exclude" || true; } |
      while read -r lib; do
        [[ -e "$BUNDLE/lib/$(basename "$lib")" ]] || cp -L "$lib" "$dest/"
      done
  }
  # Our binaries' libraries except CUDA's own (Abseil, gRPC, UCX, Gloo, and for train_test's GPU
  # trainer tests oneDNN, protobuf, libjpeg-turbo, ...).
  copy_deps "$BUNDLE/lib" 'libcud|libnccl' "$BUNDLE"/bin/*
  # UCX's transport modules (found next to libucs, or through UCX_MODULE_DIR).
  ucx_modules=$(dirname "$(ldd "$BUNDLE/bin/lmsgd-bench" | awk '/libucs.so/ {print $3}')")/ucx
  mkdir -p "$BUNDLE/lib/ucx"
  cp -L "$ucx_modules"/*.so.0 "$BUNDLE/lib/ucx/"
  # Open MPI (the benchmark's baseline), relocatable: its packages' files under ompi/ at their
  # absolute paths, and the libraries they load that the GPU machine may lack in ompi/libs.
  stage="$BUNDLE/ompi"
  for p in openmpi-bin libopenmpi3 openmpi-common libpmix2; do dpkg -L "$p"; done |
    grep -v -E '^/usr/share/(doc|man|lintian)|^/\.$' | sort -u | while read -r f; do
      if [[ -f "$f" || -L "$f" ]]; then mkdir -p "$stage$(dirname "$f")"; cp -a "$f" "$stage$f"; fi
    done
  ln -sf orterun "$stage/usr/bin/mpirun"
  mkdir -p "$stage/libs"
  mapfile -t staged < <(find "$stage" -type f \( -name '*.so*' -o -path '*/usr/bin/*' \))
  copy_deps "$stage/libs" 'libmca_common|libmpi|libopen-|liboshmem|libpmix' "${staged[@]}"
  # One xz tarball (~20 MB instead of ~90: the device tool carries at most 64 MiB).
  du -sh "$BUNDLE" | sed 's/^/unpacked: /'
  tar -C "$BUNDLE" -cJf "$BUNDLE.tar.xz" bin lib ompi
  rm -rf "$BUNDLE"/bin "$BUNDLE"/lib "$BUNDLE"/ompi
  mv "$BUNDLE.tar.xz" "$BUNDLE/bundle.tar.xz"
  du -sh "$BUNDLE"
  echo "bundle ready: carry .gpu_bundle to the GPU machine and run deploy/gpu_check.sh there"
  exit 0
fi

QUICK=0
ALLREDUCE=1
OUTDIR="${OUT:-/tmp/gpu_check}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --no-allreduce) ALLREDUCE=0 ;;
    --out) OUTDIR="$2"; shift ;;
    *) echo "usage: $0 --prepare | [--quick] [--no-allreduce] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUTDIR"
JSON="$OUTDIR/gpu_check.jsonl"
LOG="$OUTDIR/gpu_check.log"
: >"$JSON"
exec > >(tee "$LOG") 2>&1

if [[ ! -f "$BUNDLE/bundle.tar.xz" ]]; then
  echo "gpu_check: $BUNDLE/bundle.tar.xz missing: run 'deploy/gpu_check.sh --prepare' on the development machine and carry .gpu_bundle" >&2
  exit 2
fi
UNPACKED=/tmp/lmsgd-gpu-bundle
rm -rf "$UNPACKED" && mkdir -p "$UNPACKED" && tar -C "$UNPACKED" -xJf "$BUNDLE/bundle.tar.xz" || {
  echo "gpu_check: cannot unpack $BUNDLE/bundle.tar.xz" >&2
  exit 2
}
BUNDLE="$UNPACKED"

# CUDA libraries: the bundle first, then PyTorch's pip wheels (nvidia-*), then the toolkit.
LIBDIRS="$BUNDLE/lib"
SITES=$(python3 -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)
find_lib_dir() {  # the first directory holding $1 among the pip wheels and the toolkit
  local root f
  for root in $SITES /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/lib/x86_64-linux-gnu; do
    [[ -d "$root" ]] || continue
    f=$(find "$root" -name "$1" 2>/dev/null | head -1)
    if [[ -n "$f" ]]; then dirname "$f"; return 0; fi
  done
  return 1
}
add_dir() { case ":$LIBDIRS:" in *":$1:"*) ;; *) LIBDIRS="$LIBDIRS:$1" ;; esac; }
for lib in libcudnn.so.9 libnccl.so.2 libcudart.so.13; do
  dir=$(find_lib_dir "$lib") || { echo "gpu_check: $lib not found on this machine" >&2; exit 2; }
  add_dir "$dir"
done
# Loaded by cuDNN at run time when present (runtime-compiled engines, cuBLASLt-backed engines).
for lib in libnvrtc.so.13 libcublasLt.so.13; do
  dir=$(find_lib_dir "$lib") && add_dir "$dir"
done
# Only our binaries get these libraries (PyTorch's python keeps its own environment).
LIBPATH="$LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
run() { env LD_LIBRARY_PATH="$LIBPATH" "$@"; }  # (background jobs spell it out, so that $! is the process)
missing=$(for b in "$BUNDLE"/bin/*; do run ldd "$b"; done | grep 'not found' | sort -u || true)
if [[ -n "$missing" ]]; then echo "gpu_check: unresolved libraries:"; echo "$missing"; exit 2; fi

date -u +"date: %Y-%m-%dT%H:%M:%SZ"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
echo "libraries: $LIBPATH"

if [[ $QUICK == 1 ]]; then
  BATCHES=128,256
  PRECS=fp32,bf16
else
  BATCHES=64,128,256
  PRECS=fp32,tf32,bf16
fi
rc=0
echo; echo "== GPU unit tests (backend_cuda_test, comm_nccl_test, train_test) =="
run timeout 180 "$BUNDLE/bin/backend_cuda_test" --gtest_brief=1 || rc=1
run timeout 60 "$BUNDLE/bin/comm_nccl_test" --gtest_brief=1 || rc=1
run timeout 120 "$BUNDLE/bin/train_test" --gtest_brief=1 --gtest_filter='TrainerTest.Gpu*' || rc=1
echo; echo "== lmsgd-worker --standalone --device cuda:0 (ResNet-20, synthetic, bf16, 2 short epochs) =="
run timeout 120 "$BUNDLE/bin/lmsgd-worker" --standalone --device cuda:0 --job_file deploy/jobs/synthetic_resnet20_gpu.textproto \
  --checkpoint_dir /tmp/lmsgd-gpu-check-ckpt --resume=false || rc=1
echo; echo "== the same job through lmsgd-coordinator: lmsgdctl submit + watch, lmsgd-worker --device cuda:0 (NCCL id via the coordinator) =="
work=$(mktemp -d /tmp/lmsgd-gpu-dist.XXXXXX)
env LD_LIBRARY_PATH="$LIBPATH" timeout 400 "$BUNDLE/bin/lmsgd-coordinator" --listen 127.0.0.1:0 --metrics_listen 127.0.0.1:0 --state_dir "$work/state" \
  --ready_file "$work/ready" >"$work/coordinator.log" 2>&1 &
coord=$!
for _ in $(seq 1 100); do [[ -f "$work/ready" ]] && break; sleep 0.1; done
addr=$(sed -n 's/^grpc=//p' "$work/ready" 2>/dev/null)
if [[ -z "$addr" ]]; then
  echo "FAILED: the coordinator did not start:"; cat "$work/coordinator.log"; rc=1
else
  job=$(run "$BUNDLE/bin/lmsgdctl" --coordinator "$addr" submit deploy/jobs/synthetic_resnet20_gpu.textproto)
  echo "submitted: $job"
  env LD_LIBRARY_PATH="$LIBPATH" timeout 150 "$BUNDLE/bin/lmsgd-worker" --coordinator "$addr" --job "$job" --device cuda:0 \
    --checkpoint_dir "$work/ckpt" --resume=false --join_timeout_s 60 >"$work/worker0.log" 2>&1 &
  wpid=$!
  env LD_LIBRARY_PATH="$LIBPATH" timeout 160 "$BUNDLE/bin/lmsgdctl" --coordinator "$addr" watch "$job" >"$work/watch.log" 2>&1 &
  watchpid=$!
  wait "$wpid"
  wrc=$?
  # The worker has ended: the job's end reaches watch within moments.
  for _ in $(seq 1 50); do kill -0 "$watchpid" 2>/dev/null || break; sleep 0.2; done
  kill "$watchpid" 2>/dev/null
  wait "$watchpid"
  watchrc=$?
  tail -3 "$work/watch.log"
  run "$BUNDLE/bin/lmsgdctl" --coordinator "$addr" status "$job"
  if [[ $wrc == 0 && $watchrc == 0 ]]; then
    echo "distributed GPU job: SUCCEEDED"
  else
    echo "FAILED: distributed GPU job (worker exit $wrc, watch exit $watchrc; worker log follows)"; rc=1
  fi
  tail -25 "$work/worker0.log"
  cp "$work/worker0.log" "$OUTDIR/dist_worker0.log" 2>/dev/null
fi
kill -TERM "$coord" 2>/dev/null; wait "$coord" 2>/dev/null
echo
run timeout 180 "$BUNDLE/bin/lmsgd-gpu-check" --mode=agree --json="$JSON" || rc=1
run timeout 300 "$BUNDLE/bin/lmsgd-gpu-check" --mode=speed --batches=$BATCHES --precisions=$PRECS --json="$JSON" || rc=1
echo; echo "== PyTorch baseline =="
timeout 240 python3 tests/bench/pytorch_gpu_train.py --batches=$BATCHES --precisions=$PRECS --json="$JSON" || rc=1

if [[ $ALLREDUCE == 1 ]]; then
  echo; echo "== CPU allreduce (UCX shared memory, no GPU): lmsgd vs Gloo vs Open MPI, $(nproc) cores =="
  # Rounds of k = 2 and k = 4 in turn, one JSON line per (impl, algo, size) each, while the time
  # allows (a slow spell then lands on both k); the summary takes each row's median over rounds.
  AR="$OUTDIR/allreduce.jsonl"
  : >"$AR"
  ompi="$BUNDLE/ompi"
  (
    export UCX_MODULE_DIR="$BUNDLE/lib/ucx"
    export OPAL_PREFIX="$ompi/usr" OPAL_SYSCONFDIR="$ompi/etc/openmpi" OPAL_PKGDATADIR="$ompi/usr/share/openmpi"
    export OPAL_LIBDIR="$ompi/usr/lib/x86_64-linux-gnu/openmpi/lib" OPAL_PKGLIBDIR="$ompi/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3"
    px="$ompi/usr/lib/x86_64-linux-gnu/pmix2"
    export PMIX_INSTALL_PREFIX="$px" PMIX_LIBDIR="$px/lib" PMIX_PKGLIBDIR="$px/lib/pmix" PMIX_DATADIR="$px/share" PMIX_PKGDATADIR="$px/share/pmix"
    export PATH="$ompi/usr/bin:$PATH"
    LIBPATH="$LIBPATH:$ompi/usr/lib/x86_64-linux-gnu:$px/lib:$ompi/libs"
    t0=$SECONDS
    # The communicator's lanes (c = 1, 2, 4; 4 allreduces in flight), k = 4, up to 1 MiB: first,
    # counted in the allreduce budget (ALLREDUCE_BUDGET_S), so the check takes no longer.
    run timeout 30 "$BUNDLE/bin/lmsgd-bench" allreduce --ranks=4 --rounds=1 --json --min_bytes=4096 \
      --max_bytes=1048576 --impls=lmsgd-lanes,lmsgd-tcp-lanes >>"$AR" || echo "FAILED: allreduce lanes k=4"
    for round in 1 2 3; do
      for k in 2 4; do
        (( SECONDS - t0 < ${ALLREDUCE_BUDGET_S:-200} )) || break 2
        echo "round $round, k=$k ($((SECONDS - t0)) s)"
        run timeout 100 "$BUNDLE/bin/lmsgd-bench" allreduce --ranks=$k --rounds=1 --json --min_bytes=4096 \
          --max_bytes=268435456 --impls=lmsgd,gloo,openmpi >>"$AR" || echo "FAILED: allreduce benchmark k=$k round $round"
        # Ring and halving/doubling over UCX's TCP transport (the wire between hosts), up to 1 MiB.
        run timeout 60 "$BUNDLE/bin/lmsgd-bench" allreduce --ranks=$k --rounds=1 --json --min_bytes=4096 \
          --max_bytes=1048576 --impls=lmsgd-tcp >>"$AR" || echo "FAILED: allreduce benchmark (tcp) k=$k round $round"
      done
    done
  )
  python3 - "$AR" <<'EOF' | tee "$OUTDIR/allreduce_summary.txt"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
t = {}
for r in rows:
    t.setdefault((r["k"], r["impl"], r["algo"], r["bytes"]), []).append(r["time_us"])
med = {key: statistics.median(v) for key, v in t.items()}
rounds = max((len(v) for v in t.values()), default=0)
for k in sorted({key[0] for key in med}):
    print(f"\nallreduce k={k}: median time_us of {rounds} rounds; busbw GB/s = bytes/time * 2(k-1)/k")
    print(f"{'bytes':>10s} {'ring':>9s} {'hd':>9s} {'shm':>9s} {'gloo':>9s} {'openmpi':>9s}"
          f" {'lmsgd best':>16s} {'busbw':>6s} {'best/mpi':>8s} {'ring/hd':>7s} {'tcp ring':>9s} {'tcp hd':>9s}"
          f" {'ring/hd':>7s}")
    for b in sorted({key[3] for key in med if key[0] == k and not key[1].endswith("-lanes")}):
        lm = {a: us for (kk, impl, a, bb), us in med.items() if kk == k and bb == b and impl == "lmsgd"}
        gl = min((us for (kk, impl, a, bb), us in med.items() if kk == k and bb == b and impl == "gloo"), default=None)
        mpi = med.get((k, "openmpi", "MPI_Allreduce", b))
        best = min(lm, key=lm.get) if lm else None
        bw = (b / (lm[best] * 1e-6) / 1e9 * 2 * (k - 1) / k) if best else 0.0
        f = lambda v: f"{v:9.1f}" if v else f"{'-':>9s}"
        ratio = f"{mpi / lm[best]:8.2f}" if best and mpi else f"{'-':>8s}"
        rh = f"{lm['ring'] / lm['halving_doubling']:7.2f}" if "ring" in lm and "halving_doubling" in lm else f"{'-':>7s}"
        tc = {a: us for (kk, impl, a, bb), us in med.items() if kk == k and bb == b and impl == "lmsgd-tcp"}
        th = f"{tc['ring'] / tc['halving_doubling']:7.2f}" if "ring" in tc and "halving_doubling" in tc else f"{'-':>7s}"
        print(f"{b:10d} {f(lm.get('ring'))} {f(lm.get('halving_doubling'))} {f(lm.get('shared_memory'))}"
              f" {f(gl)} {f(mpi)} {best or '-':>16s} {bw:6.2f} {ratio} {rh}"
              f" {f(tc.get('ring'))} {f(tc.get('halving_doubling'))} {th}")
    lanes = {(impl, a, bb): us for (kk, impl, a, bb), us in med.items() if kk == k and impl.endswith("-lanes")}
    if lanes:
        print(f"lanes k={k}: time per allreduce (us) with c lanes, 4 in flight; c1/c2 and c1/c4 = speed-ups")
        for impl in ("lmsgd-lanes", "lmsgd-tcp-lanes"):
            for b in sorted({bb for (i, a, bb) in lanes if i == impl}):
                c = {n: lanes.get((impl, f"auto_c{n}", b)) for n in (1, 2, 4)}
                sp = lambda n: f"{c[1] / c[n]:6.2f}" if c[1] and c[n] else f"{'-':>6s}"
                print(f"{impl:>16s} {b:10d} {f(c[1])} {f(c[2])} {f(c[4])} {sp(2)} {sp(4)}")
EOF
fi

python3 - "$JSON" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
speed = {}
for r in rows:
    if r.get("kind") == "speed":
        speed[(r["impl"], r["precision"], r["batch"])] = r
print("\n== ResNet-50 training throughput, one GPU (img/s, median step) ==")
print(f"{'precision':9s} {'batch':>5s} {'lmsgd':>10s} {'pytorch':>10s} {'ratio':>7s}")
keys = sorted({(p, b) for (_, p, b) in speed}, key=lambda k: (["fp32", "tf32", "bf16"].index(k[0]), k[1]))
for p, b in keys:
    l = speed.get(("lmsgd", p, b), {})
    t = speed.get(("pytorch", p, b), {})
    li, ti = l.get("img_s"), t.get("img_s")
    ratio = f"{li / ti:7.2f}" if li and ti else "      -"
    fmt = lambda v, r: f"{v:10.1f}" if v else f"{'ERR' if 'error' in r else '-':>10s}"
    print(f"{p:9s} {b:5d} {fmt(li, l)} {fmt(ti, t)} {ratio}")
agree = [r for r in rows if r.get("kind") == "agreement"]
if agree:
    print(f"agreement: {sum(r['pass'] for r in agree)}/{len(agree)} cases pass")
EOF
exit $rc
