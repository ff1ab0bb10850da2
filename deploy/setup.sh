#!/usr/bin/env bash
# Installs every Debian package lmsgd needs to build, test and run. Idempotent:
# packages already present are skipped, so a second run does nothing.
#   deploy/setup.sh                    build + test + runtime dependencies
#   deploy/setup.sh --with-baselines   also the benchmark baselines (python3-torch, Open MPI, Gloo)
set -euo pipefail

with_baselines=0
for arg in "$@"; do
  case "$arg" in
    --with-baselines) with_baselines=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg'" >&2; exit 2 ;;
  esac
done

packages=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev
  libucx-dev ucx-utils
  prometheus-cpp-dev
  libdnnl-dev
  libturbojpeg0-dev libjpeg62-turbo-dev zlib1g-dev
  libgtest-dev libgmock-dev googletest libbenchmark-dev
  dataset-fashion-mnist
  curl openssl iproute2 procps python3 python3-yaml
  gnuplot-nox
)
if [ "$with_baselines" = 1 ]; then
  packages+=(python3-torch python3-torchvision libopenmpi-dev openmpi-bin libgloo-dev)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup.sh: all ${#packages[@]} packages already installed"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup.sh: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "setup.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
