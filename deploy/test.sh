#!/usr/bin/env bash
# Runs every lmsgd test on a fresh machine: installs packages if missing, configures,
# builds, and runs ctest. Usage: deploy/test.sh [ctest args...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
deploy/setup.sh
build_dir="${LMSGD_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$build_dir" -j"$(nproc)"
ctest --test-dir "$build_dir" --output-on-failure -j"$(nproc)" "$@"
