// Every message tag the collectives use, in one table.
//
// A tag is MakeTag(sequence, step) (transport.h): the collective's sequence number in the high
// bits and a 16-bit step in the low ones. Collectives are numbered from 1 in the order every
// rank issues them, so two collectives never share a tag and only the steps inside one
// collective need to differ. The step space of one collective, by algorithm (only one
// algorithm runs per sequence):
//
//   ring            reduce-scatter  step s, segment j   s * 64 + j               [0, 64 (k-1))
//                   allgather       step s              64 k + s                 [64 k, 65 k)
//   halving/        reduce-scatter  step t, segment j   1000 + t * 64 + j        [1000, 3048)
//   doubling        merged middle   (one exchange)      150
//                   hand up         from block c        200 + c                  [200, 232)
//                   allgather       block 0, step u     300 + u                  [300, 332)
//                   hand down       to block c          400 + c                  [400, 432)
//                   allgather       block c > 0, step u 500 + u                  [500, 532)
//                   recursive doubling: fold 600, step d 610 + d, hand back 700
//   hierarchical    to the leader 0, from the leader 1; the leaders' own allreduce runs on
//                   sequence | kLeaderSequenceBit, so its ring/halving steps cannot collide
//   broadcast       binomial round m                    m                        [0, 32)
//   barrier         a one-element recursive doubling (steps as above)
//   shared-memory   setup: segment name 1, mapped 2, go 3 (on a sequence no collective uses)
//
// The ring's steps bound k to 1000 ranks (64 k + s < 2^16).
#pragma once

#include <cstdint>

namespace lmsgd::comm::tags {

// A segmented step (AppendSegmented) takes this many consecutive steps, one per segment.
inline constexpr uint32_t kSegmentsPerStep = 64;
inline constexpr uint32_t RingReduceScatter(int step) { return static_cast<uint32_t>(step) * kSegmentsPerStep; }
inline constexpr uint32_t RingAllgather(int world, int step) {
  return kSegmentsPerStep * static_cast<uint32_t>(world) + static_cast<uint32_t>(step);
}

inline constexpr uint32_t HalvingStep(uint32_t step) { return 1000 + step * kSegmentsPerStep; }
inline constexpr uint32_t kMergedMiddle = 150;
inline constexpr uint32_t kHandUp = 200;              // + sending block's index
inline constexpr uint32_t kBlockZeroAllgather = 300;  // + step
inline constexpr uint32_t kHandDown = 400;            // + receiving block's index
inline constexpr uint32_t kBlockAllgather = 500;      // + step
inline constexpr uint32_t kDoublingFold = 600;
inline constexpr uint32_t kDoublingStep = 610;        // + step
inline constexpr uint32_t kDoublingHandBack = 700;

inline constexpr uint32_t BroadcastRound(int round) { return static_cast<uint32_t>(round); }

inline constexpr uint32_t kToLeader = 0;
inline constexpr uint32_t kFromLeader = 1;
inline constexpr uint64_t kLeaderSequenceBit = uint64_t{1} << 31;

inline constexpr uint32_t kShmSegmentName = 1;
inline constexpr uint32_t kShmMapped = 2;
inline constexpr uint32_t kShmGo = 3;

}  // namespace lmsgd::comm::tags
