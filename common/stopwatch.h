// Seconds elapsed on the monotonic clock, for step-phase timings and rates.
#pragma once

#include <chrono>

namespace lmsgd {

using SteadyClock = std::chrono::steady_clock;

inline double SecondsSince(SteadyClock::time_point t) {
  return std::chrono::duration<double>(SteadyClock::now() - t).count();
}

}  // namespace lmsgd
