// Bounded, multi-threaded batch assembly.
//
// Batches are numbered 0..num_batches-1; batch b holds examples indices[b*batch ..
// (b+1)*batch). Decoder threads claim batch numbers in order but never more than `prefetch`
// ahead of the consumer, so memory stays bounded; Next() returns batches strictly in order.
// Each example's augmentation seed is AugmentSeed(seed, epoch, index): the output is the
// same whatever the thread count.
//
// A failing example (corrupt file) fails its batch with an error naming the file, unless
// skip_corrupt: then the slot is filled with the next example of `indices` (cyclically) that
// loads, and skipped() counts it. Next() waits at most `timeout` (DEADLINE_EXCEEDED names
// the batch); the destructor stops and joins the threads.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/data/dataset.h"

namespace lmsgd::data {

struct Batch {
  uint64_t number = 0;            // within the epoch
  std::vector<float> images;      // (batch, C, H, W), with PixelFormat::kFloatChw
  std::vector<uint8_t> pixels;    // (batch, H, W, C), with PixelFormat::kUint8Hwc
  std::vector<int32_t> labels;    // (batch)
  int valid = 0;                  // leading examples that are real (< batch only when pad_last)
};

struct LoaderOptions {
  int batch = 32;
  bool train = true;
  uint64_t seed = 0;
  uint64_t epoch = 0;
  int threads = 2;
  int prefetch = 4;
  bool skip_corrupt = false;
  uint64_t first_batch = 0;  // start here (resume inside an epoch)
  // Evaluation: also produce the last partial batch, padded with copies of its first example
  // (Batch::valid says how many are real).
  bool pad_last = false;
  // kUint8Hwc fills Batch::pixels instead of Batch::images (Dataset::SupportsUint8).
  PixelFormat format = PixelFormat::kFloatChw;
};

class BatchLoader {
 public:
  // Only whole batches (the last indices.size() % batch examples are dropped) unless pad_last.
  BatchLoader(const Dataset* dataset, std::vector<uint64_t> indices, LoaderOptions options);
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  uint64_t num_batches() const { return num_batches_; }
  // The next batch in order; OUT_OF_RANGE after the last one.
  absl::StatusOr<std::unique_ptr<Batch>> Next(absl::Duration timeout);
  // Hands a consumed batch back for reuse: its buffers are refilled in place instead of
  // freshly allocated (a float batch of 256 ImageNet crops is 154 MB, whose page faults and
  // zeroing cost as much as a fifth of the decoding).
  void Recycle(std::unique_ptr<Batch> batch);
  int64_t skipped() const { return skipped_.load(); }

 private:
  void Work();
  absl::StatusOr<std::unique_ptr<Batch>> Build(uint64_t number);

  const Dataset* ds_;
  std::vector<uint64_t> indices_;
  LoaderOptions opt_;
  uint64_t num_batches_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t next_claim_;     // next batch number a thread will build
  uint64_t next_consume_;   // next batch number Next() returns
  std::map<uint64_t, absl::StatusOr<std::unique_ptr<Batch>>> ready_;
  std::vector<std::unique_ptr<Batch>> free_;  // recycled, at most prefetch + threads
  bool stop_ = false;
  std::atomic<int64_t> skipped_{0};
  std::vector<std::thread> threads_;
};

}  // namespace lmsgd::data
