// Shared pieces of the allreduce benchmark (nccl-tests style): sizes, iteration counts and the
// result line every implementation prints from rank 0.
#pragma once

#include <cstdint>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

namespace lmsgd::bench {

// What one rank of lmsgd's rows runs: `algos`, the rows by name ("ring", "ring_bf16", ...; empty:
// all); `separate_hosts`, ranks on different hosts as UCX sees them (lmsgd-bench --link).
struct RankOptions {
  std::set<std::string> algos;
  bool separate_hosts = false;
};

// min_bytes, 4x, ... up to max_bytes (multiples of 4 bytes).
inline std::vector<size_t> Sizes(size_t min_bytes, size_t max_bytes) {
  std::vector<size_t> out;
  for (size_t b = min_bytes; b <= max_bytes; b *= 4) out.push_back((b + 3) / 4 * 4);
  return out;
}

// Enough iterations for ~0.5 GB of traffic per size, at least 5, at most 2000 (a short message
// takes tens of microseconds: fewer rounds would time a few scheduler slices, not the algorithm).
inline int Iterations(size_t bytes) {
  const size_t want = (size_t{512} << 20) / std::max<size_t>(bytes, 1);
  return static_cast<int>(std::max<size_t>(5, std::min<size_t>(2000, want)));
}

// One JSON object per line: impl, algo, k, bytes, time_us, algbw_gbps, busbw_gbps.
inline std::string ResultLine(const std::string& impl, const std::string& algo, int k, size_t bytes, double seconds) {
  const double algbw = seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0;
  const double busbw = algbw * 2.0 * (k - 1) / k;
  char buf[512];
  snprintf(buf, sizeof(buf),
           "{\"impl\":\"%s\",\"algo\":\"%s\",\"k\":%d,\"bytes\":%zu,\"time_us\":%.2f,\"algbw_gbps\":%.4f,"
           "\"busbw_gbps\":%.4f}",
           impl.c_str(), algo.c_str(), k, bytes, seconds * 1e6, algbw, busbw);
  return buf;
}

}  // namespace lmsgd::bench
