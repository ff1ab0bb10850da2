#include "worker/data/loader.h"

#include "absl/strings/str_cat.h"

namespace lmsgd::data {

BatchLoader::BatchLoader(const Dataset* dataset, std::vector<uint64_t> indices, LoaderOptions options)
    : ds_(dataset), indices_(std::move(indices)), opt_(options) {
  if (opt_.batch < 1) opt_.batch = 1;
  if (opt_.prefetch < 1) opt_.prefetch = 1;
  if (opt_.threads < 1) opt_.threads = 1;
  const uint64_t b = static_cast<uint64_t>(opt_.batch);
  num_batches_ = opt_.pad_last ? (indices_.size() + b - 1) / b : indices_.size() / b;
  next_claim_ = next_consume_ = std::min(opt_.first_batch, num_batches_);
  for (int i = 0; i < opt_.threads; ++i) threads_.emplace_back([this] { Work(); });
}

BatchLoader::~BatchLoader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void BatchLoader::Work() {
  for (;;) {
    uint64_t number;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] {
        return stop_ || next_claim_ >= num_batches_ || next_claim_ < next_consume_ + static_cast<uint64_t>(opt_.prefetch);
      });
      if (stop_ || next_claim_ >= num_batches_) return;
      number = next_claim_++;
    }
    auto batch = Build(number);
    {
      std::lock_guard<std::mutex> lock(mu_);
      ready_.emplace(number, std::move(batch));
    }
    cv_.notify_all();
  }
}

absl::StatusOr<std::unique_ptr<Batch>> BatchLoader::Build(uint64_t number) {
  std::unique_ptr<Batch> b;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_.empty()) {
      b = std::move(free_.back());
      free_.pop_back();
    }
  }
  if (b == nullptr) b = std::make_unique<Batch>();
  b->number = number;
  const size_t per = static_cast<size_t>(ds_->channels()) * ds_->height() * ds_->width();
  const bool u8 = opt_.format == PixelFormat::kUint8Hwc;
  if (u8) {
    b->pixels.resize(per * opt_.batch);
  } else {
    b->images.resize(per * opt_.batch);
  }
  b->labels.resize(opt_.batch);
  b->valid = static_cast<int>(std::min<uint64_t>(opt_.batch, indices_.size() - number * opt_.batch));
  for (int i = 0; i < opt_.batch; ++i) {
    const uint64_t pos = number * opt_.batch + (i < b->valid ? i : 0);
    void* out = u8 ? static_cast<void*>(&b->pixels[per * i]) : static_cast<void*>(&b->images[per * i]);
    uint64_t index = indices_[pos];
    absl::Status st =
        ds_->GetPixels(index, opt_.train, AugmentSeed(opt_.seed, opt_.epoch, index), opt_.format, out, &b->labels[i]);
    // Replacement candidates: the following examples of this shard, cyclically.
    for (uint64_t j = 1; !st.ok() && opt_.skip_corrupt && j < std::min<uint64_t>(indices_.size(), 64); ++j) {
      skipped_.fetch_add(1);
      index = indices_[(pos + j) % indices_.size()];
      st = ds_->GetPixels(index, opt_.train, AugmentSeed(opt_.seed, opt_.epoch, index), opt_.format, out,
                          &b->labels[i]);
    }
    if (!st.ok()) {
      return absl::Status(st.code(), absl::StrCat("batch ", number, " of epoch ", opt_.epoch, ": ", st.message()));
    }
  }
  return b;
}

void BatchLoader::Recycle(std::unique_ptr<Batch> batch) {
  if (batch == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.size() < static_cast<size_t>(opt_.prefetch + opt_.threads)) free_.push_back(std::move(batch));
}

absl::StatusOr<std::unique_ptr<Batch>> BatchLoader::Next(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (next_consume_ >= num_batches_) {
    return absl::OutOfRangeError(absl::StrCat("epoch ", opt_.epoch, " has no batch after ", num_batches_));
  }
  const uint64_t want = next_consume_;
  const auto deadline = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(timeout);
  if (!cv_.wait_until(lock, deadline, [&] { return ready_.count(want) > 0; })) {
    return absl::DeadlineExceededError(absl::StrCat("waiting for batch ", want, " of epoch ", opt_.epoch, " from the data loader (",
                                                    absl::FormatDuration(timeout), ")"));
  }
  auto node = ready_.extract(want);
  ++next_consume_;
  lock.unlock();
  cv_.notify_all();
  return std::move(node.mapped());
}

}  // namespace lmsgd::data
