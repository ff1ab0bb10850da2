#include "worker/train/job_setup.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/job_spec.h"
#include "common/status_macros.h"
#include "worker/checkpoint/checkpoint.h"
#include "worker/data/image_folder.h"
#include "worker/data/tar_shards.h"
#include "worker/data/sampler.h"

namespace lmsgd::train {

absl::StatusOr<TrainerConfig> TrainerConfigFromJob(const v1::JobSpec& spec, const v1::Schedule& schedule) {
  TrainerConfig c;
  switch (spec.model()) {
    case v1::MODEL_RESNET50: c.arch = model::Arch::kResNet50; break;
    case v1::MODEL_RESNET18: c.arch = model::Arch::kResNet18; break;
    case v1::MODEL_RESNET34: c.arch = model::Arch::kResNet34; break;
    case v1::MODEL_RESNET20: c.arch = model::Arch::kResNet20; break;
    case v1::MODEL_RESNET8: c.arch = model::Arch::kResNet8; break;
    default: return absl::InvalidArgumentError(absl::StrCat("model ", v1::Model_Name(spec.model()), " is not supported"));
  }
  const auto& d = spec.dataset();
  c.in_channels = d.kind() == v1::DATASET_IDX ? 1 : 3;
  c.num_classes = static_cast<int>(d.num_classes());
  c.height = c.width = static_cast<int>(d.image_size());
  c.per_worker_batch = static_cast<int>(spec.per_worker_batch());
  c.bn_group = static_cast<int>(spec.bn_group_size());
  c.virtual_workers = static_cast<int>(spec.virtual_workers_per_worker());
  c.world_size = static_cast<uint32_t>(schedule.global_batch() / (spec.per_worker_batch() * spec.virtual_workers_per_worker()));
  c.schedule = ScheduleParams(schedule);
  c.sgd.momentum = schedule.momentum();
  c.sgd.nesterov = schedule.nesterov();
  c.sgd.weight_decay = schedule.weight_decay();
  c.sgd.weight_decay_on_bn = schedule.weight_decay_on_bn();
  c.zero_init_last_bn_gamma = spec.zero_init_last_bn_gamma();
  c.seed = spec.seed();
  c.eval_batch = std::max(c.per_worker_batch, 64);
  switch (spec.precision()) {
    case v1::PRECISION_FP32: c.precision = backend::Precision::kFp32; break;
    case v1::PRECISION_TF32: c.precision = backend::Precision::kTf32; break;
    case v1::PRECISION_BF16: c.precision = backend::Precision::kBf16; break;
    default:
      return absl::UnimplementedError(absl::StrCat("precision ", v1::Precision_Name(spec.precision()),
                                                   " is not implemented (fp16 with loss scaling); use PRECISION_BF16"));
  }
  return c;
}

absl::Status CheckDevice(const v1::JobSpec& spec, int cuda_device) {
  const bool job_gpu = spec.device() == v1::DEVICE_CUDA;
  if (job_gpu == (cuda_device >= 0)) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("the job trains on ", v1::Device_Name(spec.device()), " but this worker was started with --device ",
                   cuda_device >= 0 ? absl::StrCat("cuda:", cuda_device) : "cpu"));
}

int DataThreads(const v1::JobSpec& spec, int flag) {
  if (flag > 0) return flag;
  if (spec.dataset().decode_threads() > 0) return static_cast<int>(spec.dataset().decode_threads());
  return 2;
}

namespace {

// Training and validation sets of JPEGs; the validation set takes the training set's classes
// (an evaluation job without a training set: its own, sorted, as an ImageFolder's are).
template <typename JpegDataset>
absl::Status OpenJpegDatasets(const v1::DatasetSpec& d, bool need_train, const char* classes_are, Datasets* out) {
  const int size = static_cast<int>(d.image_size());
  std::vector<std::string> class_names;
  if (need_train || !d.train_path().empty()) {
    auto train = JpegDataset::Open(d.train_path(), size);
    if (!train.ok()) return train.status();
    if ((*train)->num_classes() != static_cast<int>(d.num_classes())) {
      return absl::InvalidArgumentError(absl::StrCat("dataset.num_classes=", d.num_classes(), " but '", d.train_path(),
                                                     "' has ", (*train)->num_classes(), " ", classes_are));
    }
    class_names = (*train)->classes();
    out->train = std::move(*train);
  }
  if (!d.val_path().empty()) {
    auto val = JpegDataset::Open(d.val_path(), size, class_names);
    if (!val.ok()) return val.status();
    if (class_names.empty() && (*val)->num_classes() != static_cast<int>(d.num_classes())) {
      return absl::InvalidArgumentError(absl::StrCat("dataset.num_classes=", d.num_classes(), " but '", d.val_path(),
                                                     "' has ", (*val)->num_classes(), " ", classes_are));
    }
    out->val = std::move(*val);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Datasets> OpenDatasets(const v1::JobSpec& spec) {
  const auto& d = spec.dataset();
  const int classes = static_cast<int>(d.num_classes());
  const bool need_train = spec.mode() != v1::JOB_MODE_EVALUATE;
  Datasets out;
  switch (d.kind()) {
    case v1::DATASET_IDX: {
      const std::string& dir = d.val_path().empty() ? d.train_path() : d.val_path();
      if (need_train) {
        auto train = data::IdxImageDataset::Load(d.train_path(), true, classes);
        if (!train.ok()) return train.status();
        out.train = std::move(*train);
      }
      auto val = data::IdxImageDataset::Load(dir, false, classes);
      if (!val.ok()) return val.status();
      if (static_cast<uint32_t>((*val)->height()) != d.image_size()) {
        return absl::InvalidArgumentError(absl::StrCat("dataset.image_size=", d.image_size(), " but the IDX images in '",
                                                       dir, "' are ", (*val)->height(), "x", (*val)->width()));
      }
      out.val = std::move(*val);
      break;
    }
    case v1::DATASET_SYNTHETIC: {
      const int s = static_cast<int>(d.image_size());
      if (need_train) out.train = std::make_unique<data::SyntheticDataset>(d.train_examples(), 3, s, s, classes);
      if (d.val_examples() > 0) out.val = std::make_unique<data::SyntheticDataset>(d.val_examples(), 3, s, s, classes);
      break;
    }
    case v1::DATASET_IMAGE_FOLDER:
      RETURN_IF_ERROR(OpenJpegDatasets<data::ImageFolderDataset>(d, need_train, "class directories", &out));
      break;
    case v1::DATASET_TAR_SHARDS:
      RETURN_IF_ERROR(OpenJpegDatasets<data::TarShardDataset>(d, need_train, "classes in its shards", &out));
      break;
    default:
      return absl::InvalidArgumentError("dataset.kind must be set");
  }
  if (need_train && out.train->size() != d.train_examples()) {
    return absl::InvalidArgumentError(absl::StrCat("dataset.train_examples=", d.train_examples(), " but '",
                                                   d.train_path(), "' holds ", out.train->size(), " examples"));
  }
  if (!need_train && out.val == nullptr) {
    return absl::InvalidArgumentError("an evaluation job needs a validation set (dataset.val_path)");
  }
  return out;
}

absl::StatusOr<InitFromCheckpoint> ApplyInitCheckpoint(const v1::JobSpec& spec, const v1::Schedule& schedule,
                                                       Trainer& trainer,
                                                       const std::function<void(const std::string&)>& log) {
  InitFromCheckpoint out;
  const std::string& path = spec.init_checkpoint();
  if (path.empty()) return out;
  const bool momentum = spec.init_mode() != v1::INIT_WEIGHTS;
  ASSIGN_OR_RETURN(checkpoint::InitState init,
                   checkpoint::LoadInitCheckpoint(path, trainer.spec().name, &trainer.store(),
                                                  momentum ? &trainer.sgd() : nullptr));
  out.has_epoch = init.has_training_state;
  out.epoch = init.state.epoch;
  std::string what = momentum ? "weights and momentum" : "weights";
  if (spec.init_mode() == v1::INIT_CONTINUE) {
    const checkpoint::TrainingState& st = init.state;
    if (st.seed != spec.seed()) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "init checkpoint '%s' was trained with seed %d and this job has seed %d: INIT_CONTINUE continues a run "
          "with its data order, so the seeds must agree (or use INIT_WEIGHTS_AND_MOMENTUM)",
          path, st.seed, spec.seed()));
    }
    out.start_iteration = st.global_batch == schedule.global_batch()
                              ? st.iteration
                              : static_cast<uint64_t>(st.epoch) * schedule.iterations_per_epoch();
    if (out.start_iteration > schedule.total_iterations()) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "init checkpoint '%s' is at iteration %d, past this job's %d iterations (%d epochs)", path,
          out.start_iteration, schedule.total_iterations(), spec.epochs()));
    }
    what = absl::StrFormat("run at epoch %d, iteration %d (the checkpoint's kn %d, this job's %d)", st.epoch,
                           out.start_iteration, st.global_batch, schedule.global_batch());
  }
  if (log) log(absl::StrCat("init from ", path, ": ", what));
  return out;
}

std::unique_ptr<data::BatchLoader> MakeEpochLoader(const v1::JobSpec& spec, const data::Dataset* train,
                                                   uint32_t epoch, uint32_t rank, uint32_t world_size,
                                                   uint64_t first_batch, int data_threads,
                                                   data::PixelFormat format) {
  data::LoaderOptions lo;
  lo.batch = static_cast<int>(spec.per_worker_batch() * spec.virtual_workers_per_worker());
  lo.train = true;
  lo.seed = spec.seed();
  lo.epoch = epoch;
  lo.threads = data_threads;
  lo.prefetch = spec.dataset().prefetch_batches() > 0 ? static_cast<int>(spec.dataset().prefetch_batches()) : 4;
  lo.skip_corrupt = spec.dataset().skip_corrupt();
  lo.first_batch = first_batch;
  lo.format = format;
  return std::make_unique<data::BatchLoader>(
      train,
      data::WorkerOrder(train->size(), spec.seed(), epoch, rank, world_size, spec.virtual_workers_per_worker(),
                        spec.per_worker_batch()),
      lo);
}

}  // namespace lmsgd::train
