#!/usr/bin/env bash
# The GPU check of issue 6, in two halves.
#
#   deploy/gpu_check.sh --prepare
#       On the development machine (Debian, CUDA 13 + cuDNN 9 + NCCL, Abseil): builds
#       lmsgd-gpu-check, cuda_test and engine_test (build-gpu/, Release) and bundles them, stripped, with the
#       shared libraries they need into .gpu_bundle/bundle.tar.xz (git-ignored; ~15 MB). The GPU machine has
#       no Debian packages, so the bundle brings what it lacks and uses its CUDA, cuDNN, cuBLAS
#       and NCCL (the toolkit's and PyTorch's pip wheels).
#
#   deploy/gpu_check.sh [--quick] [--out DIR]
#       On the GPU machine, in the repo root with .gpu_bundle/ carried along. Within ~8 minutes
#       on one H100: the GPU unit tests (cuda_test, the GPU trainer tests of engine_test), a short
#       standalone lmsgd-worker run on the GPU, the agreement table (GPU vs the float64
#       reference, fp32 and bf16), ResNet-50 training throughput for lmsgd and for PyTorch
#       (torchvision resnet50, channels_last, autocast bf16) at batch 64/128/256 x
#       fp32/tf32/bf16, and last one table with the ratio. --quick: batch 128 and 256 in bf16
#       and fp32 only. Results also go to DIR (default $OUT or /tmp/gpu_check) as
#       gpu_check.jsonl and gpu_check.log.
#
# With the device tool: run(command="deploy/gpu_check.sh", carry=[".gpu_bundle"], timeout_s=540).
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.gpu_bundle

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DLMSGD_WITH_CUDA=ON >/dev/null
  cmake --build build-gpu --target lmsgd-gpu-check cuda_test engine_test lmsgd-worker
  rm -rf "$BUNDLE"
  mkdir -p "$BUNDLE/bin" "$BUNDLE/lib"
  for b in build-gpu/tests/lmsgd-gpu-check build-gpu/tests/cuda_test build-gpu/tests/engine_test \
           build-gpu/worker/lmsgd-worker; do
    strip -o "$BUNDLE/bin/$(basename "$b")" "$b"
  done
  # Everything the binaries load except glibc, libstdc++/libgcc and CUDA's own libraries
  # (Abseil, and for engine_test's GPU trainer tests oneDNN, protobuf, libjpeg-turbo, ...).
  for b in "$BUNDLE"/bin/*; do
    ldd "$b" | awk '/=>/ {print $3}' |
      grep -v -E '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+)\.so|libcud|libnccl' || true
  done | sort -u | while read -r lib; do cp -L "$lib" "$BUNDLE/lib/"; done
  # One xz tarball (~15 MB instead of ~65: the device tool carries at most 64 MiB).
  tar -C "$BUNDLE" -cJf "$BUNDLE.tar.xz" bin lib
  rm -rf "$BUNDLE"/bin "$BUNDLE"/lib
  mv "$BUNDLE.tar.xz" "$BUNDLE/bundle.tar.xz"
  du -sh "$BUNDLE"
  echo "bundle ready: carry .gpu_bundle to the GPU machine and run deploy/gpu_check.sh there"
  exit 0
fi

QUICK=0
OUTDIR="${OUT:-/tmp/gpu_check}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUTDIR="$2"; shift ;;
    *) echo "usage: $0 --prepare | [--quick] [--out DIR]" >&2; exit 2 ;;
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
run() { env LD_LIBRARY_PATH="$LIBPATH" "$@"; }
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
echo; echo "== GPU unit tests (cuda_test) =="
run timeout 180 "$BUNDLE/bin/cuda_test" --gtest_brief=1 || rc=1
run timeout 120 "$BUNDLE/bin/engine_test" --gtest_brief=1 --gtest_filter='TrainerTest.Gpu*' || rc=1
echo; echo "== lmsgd-worker --standalone --device cuda:0 (ResNet-20, synthetic, bf16, 2 short epochs) =="
run timeout 120 "$BUNDLE/bin/lmsgd-worker" --standalone --device cuda:0 --job_file deploy/jobs/synthetic_resnet20_gpu.textproto \
  --checkpoint_dir /tmp/lmsgd-gpu-check-ckpt --resume=false || rc=1
echo
run timeout 180 "$BUNDLE/bin/lmsgd-gpu-check" --mode=agree --json="$JSON" || rc=1
run timeout 300 "$BUNDLE/bin/lmsgd-gpu-check" --mode=speed --batches=$BATCHES --precisions=$PRECS --json="$JSON" || rc=1
echo; echo "== PyTorch baseline =="
timeout 240 python3 tests/bench/pytorch_gpu_train.py --batches=$BATCHES --precisions=$PRECS --json="$JSON" || rc=1

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
