#include "worker/train/trainer.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/data/loader.h"

namespace lmsgd::train {

absl::Status Trainer::InitCommon(const TrainerConfig& c) {
  if (c.per_worker_batch < 1 || c.virtual_workers < 1 || c.world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("per_worker_batch=", c.per_worker_batch, " virtual_workers=",
                                                   c.virtual_workers, " world_size=", c.world_size, " must be >= 1"));
  }
  config_ = c;
  ASSIGN_OR_RETURN(spec_, model::MakeResNet(c.arch, c.in_channels, c.num_classes));
  store_ = std::make_unique<model::ParamStore>(spec_);
  RETURN_IF_ERROR(store_->Load(model::InitializeParameters(spec_, {c.seed, c.zero_init_last_bn_gamma})));
  sgd_ = std::make_unique<optim::Sgd>(c.sgd, store_->OptimizerParams());
  return absl::OkStatus();
}

absl::StatusOr<EvalCounts> Trainer::CountCorrect(const data::Dataset& ds, uint32_t rank, uint32_t world, int threads,
                                                 int batch, const PredictFn& predict) {
  std::vector<uint64_t> indices;
  for (uint64_t i = rank; i < ds.size(); i += world) indices.push_back(i);
  data::LoaderOptions lo;
  lo.batch = batch;
  lo.train = false;
  lo.threads = threads;
  lo.pad_last = true;
  data::BatchLoader loader(&ds, std::move(indices), lo);
  EvalCounts counts;
  const int K = config_.num_classes;
  std::vector<float> logits(static_cast<size_t>(batch) * K);
  for (uint64_t b = 0; b < loader.num_batches(); ++b) {
    auto next = loader.Next(absl::Minutes(10));
    if (!next.ok()) return Annotate(next.status(), "evaluation");
    const data::Batch& bt = **next;
    RETURN_IF_ERROR(predict(bt.images.data(), logits.data()));
    for (int i = 0; i < bt.valid; ++i) {
      const float* z = &logits[static_cast<size_t>(i) * K];
      const float target = z[bt.labels[i]];
      // Rank of the true class: how many classes score strictly higher (ties favour the label).
      int higher = 0;
      for (int k = 0; k < K; ++k) higher += z[k] > target;
      counts.examples++;
      counts.top1_correct += higher < 1;
      counts.top5_correct += higher < 5;
    }
  }
  return counts;
}

}  // namespace lmsgd::train
