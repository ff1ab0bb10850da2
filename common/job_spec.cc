#include "common/job_spec.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"

namespace lmsgd {
namespace {

constexpr uint64_t kImageNetTrain = 1281167;
constexpr uint64_t kImageNetVal = 50000;
constexpr uint64_t kMiB = 1024 * 1024;

bool Finite(double v) { return std::isfinite(v); }

class CollectErrors : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    errors.push_back(absl::StrCat(line + 1, ":", column + 1, ": ", message));
  }
  void AddWarning(int line, google::protobuf::io::ColumnNumber column,
                  const std::string& message) override {
    errors.push_back(absl::StrCat(line + 1, ":", column + 1, ": warning: ", message));
  }
  std::vector<std::string> errors;
};

}  // namespace

void ApplyDefaults(v1::JobSpec* s) {
  if (s->model() == v1::MODEL_UNSPECIFIED) s->set_model(v1::MODEL_RESNET50);
  auto* d = s->mutable_dataset();
  const bool idx = d->kind() == v1::DATASET_IDX;
  if (d->num_classes() == 0) d->set_num_classes(idx ? 10 : 1000);
  if (d->image_size() == 0) d->set_image_size(idx ? 28 : 224);
  if (d->train_examples() == 0) {
    if (idx) d->set_train_examples(60000);
    if (d->kind() == v1::DATASET_SYNTHETIC) d->set_train_examples(kImageNetTrain);
  }
  if (d->val_examples() == 0) {
    if (idx) d->set_val_examples(10000);
    if (d->kind() == v1::DATASET_SYNTHETIC) d->set_val_examples(kImageNetVal);
  }
  if (d->prefetch_batches() == 0) d->set_prefetch_batches(4);

  if (s->world_size() == 0) s->set_world_size(1);
  if (s->per_worker_batch() == 0) s->set_per_worker_batch(32);
  if (s->bn_group_size() == 0) s->set_bn_group_size(std::min<uint32_t>(32, s->per_worker_batch()));
  if (s->virtual_workers_per_worker() == 0) s->set_virtual_workers_per_worker(1);
  if (s->epochs() == 0) s->set_epochs(90);
  if (!s->has_base_lr()) s->set_base_lr(0.1);
  if (s->reference_batch() == 0) s->set_reference_batch(256);
  if (s->warmup() == v1::WARMUP_UNSPECIFIED) s->set_warmup(v1::WARMUP_GRADUAL);
  if (s->lr_scaling() == v1::LR_SCALING_UNSPECIFIED) s->set_lr_scaling(v1::LR_SCALING_LINEAR);
  if (!s->has_warmup_epochs()) s->set_warmup_epochs(s->warmup() == v1::WARMUP_NONE ? 0 : 5);
  if (s->lr_decay_epochs().empty()) {
    // The paper's 30/60/80, keeping those inside the run (a 10-epoch job has no decay).
    for (uint32_t e : {30u, 60u, 80u}) {
      if (e < s->epochs()) s->add_lr_decay_epochs(e);
    }
  }
  if (!s->has_lr_decay_factor()) s->set_lr_decay_factor(0.1);
  if (!s->has_momentum()) s->set_momentum(0.9);
  if (!s->has_weight_decay()) s->set_weight_decay(1e-4);
  if (!s->has_zero_init_last_bn_gamma()) s->set_zero_init_last_bn_gamma(true);
  if (s->bucket_bytes() == 0) s->set_bucket_bytes(25 * kMiB);
  if (s->first_bucket_bytes() == 0) s->set_first_bucket_bytes(std::min<uint64_t>(kMiB, s->bucket_bytes()));
  if (s->min_workers() == 0) s->set_min_workers(s->world_size());
  if (s->max_workers() == 0) s->set_max_workers(s->world_size());
  if (!s->has_max_recoveries()) s->set_max_recoveries(10);
  if (!s->has_collective_timeout_s()) s->set_collective_timeout_s(60);
  if (s->concurrent_allreduces() == 0) s->set_concurrent_allreduces(1);
}

uint64_t GlobalBatch(const v1::JobSpec& spec, uint32_t world_size) {
  return static_cast<uint64_t>(world_size) * spec.virtual_workers_per_worker() *
         spec.per_worker_batch();
}

std::vector<std::string> JobSpecErrors(const v1::JobSpec& s) {
  std::vector<std::string> e;
  auto bad = [&e](const std::string& field, const std::string& why) {
    e.push_back(absl::StrCat(field, ": ", why));
  };
  if (s.name().size() > 256) bad("name", "longer than 256 characters");
  if (!v1::Model_IsValid(s.model()) || s.model() == v1::MODEL_UNSPECIFIED) {
    bad("model", absl::StrCat("unknown model ", s.model()));
  }
  const auto& d = s.dataset();
  const bool evaluate = s.mode() == v1::JOB_MODE_EVALUATE;
  if (!v1::JobMode_IsValid(s.mode())) bad("mode", "unknown job mode");
  if (!v1::GradientExchangeDtype_IsValid(s.gradient_exchange_dtype())) {
    bad("gradient_exchange_dtype", "must be GRADIENT_EXCHANGE_FP32 or GRADIENT_EXCHANGE_BF16");
  }
  if (!v1::InitMode_IsValid(s.init_mode())) bad("init_mode", "unknown init mode");
  if (s.init_checkpoint().size() > 4096) bad("init_checkpoint", "longer than 4096 characters");
  if (s.init_mode() != v1::INIT_WEIGHTS && s.init_checkpoint().empty()) {
    bad("init_mode", absl::StrCat(v1::InitMode_Name(s.init_mode()), " needs init_checkpoint"));
  }
  if (evaluate) {
    if (s.init_checkpoint().empty()) bad("init_checkpoint", "required for JOB_MODE_EVALUATE (the weights to evaluate)");
    if (s.init_mode() != v1::INIT_WEIGHTS) bad("init_mode", "JOB_MODE_EVALUATE reads the weights only (INIT_WEIGHTS)");
    switch (d.kind()) {
      case v1::DATASET_IMAGE_FOLDER:
      case v1::DATASET_TAR_SHARDS:
        if (d.val_path().empty()) bad("dataset.val_path", "required for JOB_MODE_EVALUATE (the set to evaluate)");
        break;
      case v1::DATASET_IDX:
        if (d.val_path().empty() && d.train_path().empty()) {
          bad("dataset.val_path", "required for JOB_MODE_EVALUATE (the directory of the t10k IDX files)");
        }
        break;
      case v1::DATASET_SYNTHETIC:
        if (d.val_examples() == 0) bad("dataset.val_examples", "must be > 0 for JOB_MODE_EVALUATE");
        break;
      default:
        bad("dataset.kind", "must be DATASET_IMAGE_FOLDER, DATASET_TAR_SHARDS, DATASET_IDX or DATASET_SYNTHETIC");
    }
  }
  switch (evaluate ? v1::DATASET_UNSPECIFIED : d.kind()) {
    case v1::DATASET_UNSPECIFIED:
      if (!evaluate) bad("dataset.kind", "must be DATASET_IMAGE_FOLDER, DATASET_TAR_SHARDS, DATASET_IDX or DATASET_SYNTHETIC");
      break;
    case v1::DATASET_IMAGE_FOLDER:
      if (d.train_path().empty()) bad("dataset.train_path", "required for IMAGE_FOLDER");
      if (d.train_examples() == 0) {
        bad("dataset.train_examples", "required for IMAGE_FOLDER (ImageNet-1k: 1281167)");
      }
      break;
    case v1::DATASET_TAR_SHARDS:
      if (d.train_path().empty()) bad("dataset.train_path", "required for TAR_SHARDS (a directory of .tar shards or a comma-separated list)");
      if (d.train_examples() == 0) bad("dataset.train_examples", "required for TAR_SHARDS (ImageNet-1k: 1281167)");
      break;
    case v1::DATASET_IDX:
      if (d.train_path().empty()) bad("dataset.train_path", "required for IDX (directory of the IDX files)");
      break;
    case v1::DATASET_SYNTHETIC:
      break;
    default:
      bad("dataset.kind", "must be DATASET_IMAGE_FOLDER, DATASET_TAR_SHARDS, DATASET_IDX or DATASET_SYNTHETIC");
  }
  if (d.train_path().size() > 4096) bad("dataset.train_path", "longer than 4096 characters");
  if (d.val_path().size() > 4096) bad("dataset.val_path", "longer than 4096 characters");
  if (d.num_classes() < 2 || d.num_classes() > 100000) bad("dataset.num_classes", "must be in [2, 100000]");
  if (d.image_size() < 8 || d.image_size() > 4096) bad("dataset.image_size", "must be in [8, 4096]");
  if (d.prefetch_batches() > 1024) bad("dataset.prefetch_batches", "must be <= 1024");
  if (d.decode_threads() > 1024) bad("dataset.decode_threads", "must be <= 1024");

  if (s.world_size() < 1 || s.world_size() > 65536) bad("world_size", "must be in [1, 65536]");
  if (s.per_worker_batch() < 1 || s.per_worker_batch() > 65536) bad("per_worker_batch", "must be in [1, 65536]");
  if (s.bn_group_size() < 1 || s.bn_group_size() > s.per_worker_batch()) {
    bad("bn_group_size", absl::StrCat("must be in [1, per_worker_batch=", s.per_worker_batch(), "]"));
  } else if (s.per_worker_batch() % s.bn_group_size() != 0) {
    bad("bn_group_size", absl::StrCat("must divide per_worker_batch=", s.per_worker_batch()));
  }
  if (s.virtual_workers_per_worker() < 1 || s.virtual_workers_per_worker() > 4096) {
    bad("virtual_workers_per_worker", "must be in [1, 4096]");
  }
  if (s.epochs() < 1 || s.epochs() > 100000) bad("epochs", "must be in [1, 100000]");
  if (!Finite(s.base_lr()) || s.base_lr() <= 0) bad("base_lr", "must be a positive number");
  if (s.reference_batch() < 1) bad("reference_batch", "must be >= 1");
  if (!v1::WarmupKind_IsValid(s.warmup())) bad("warmup", "unknown warmup kind");
  if (!v1::LrScaling_IsValid(s.lr_scaling())) bad("lr_scaling", "unknown LR scaling rule");
  if (!Finite(s.warmup_epochs()) || s.warmup_epochs() < 0 || s.warmup_epochs() > s.epochs()) {
    bad("warmup_epochs", absl::StrCat("must be in [0, epochs=", s.epochs(), "]"));
  }
  uint32_t prev = 0;
  for (int i = 0; i < s.lr_decay_epochs_size(); ++i) {
    uint32_t ep = s.lr_decay_epochs(i);
    if (ep == 0 || ep >= s.epochs() || (i > 0 && ep <= prev)) {
      bad(absl::StrCat("lr_decay_epochs[", i, "]"),
          absl::StrCat("must be increasing and in [1, epochs=", s.epochs(), "), got ", ep));
    }
    prev = ep;
  }
  if (!Finite(s.lr_decay_factor()) || s.lr_decay_factor() <= 0 || s.lr_decay_factor() > 1) {
    bad("lr_decay_factor", "must be in (0, 1]");
  }
  if (!Finite(s.momentum()) || s.momentum() < 0 || s.momentum() >= 1) bad("momentum", "must be in [0, 1)");
  if (s.nesterov() && s.momentum() == 0) bad("nesterov", "needs momentum > 0");
  if (!Finite(s.weight_decay()) || s.weight_decay() < 0 || s.weight_decay() > 1) {
    bad("weight_decay", "must be in [0, 1]");
  }
  if (s.checkpoint_interval_epochs() > s.epochs()) bad("checkpoint_interval_epochs", "must be <= epochs");
  if (s.checkpoint_dir().size() > 4096) bad("checkpoint_dir", "longer than 4096 characters");
  if (!v1::AllreduceAlgorithm_IsValid(s.allreduce())) bad("allreduce", "unknown algorithm");
  if (s.bucket_bytes() < 1024 || s.bucket_bytes() > (1ull << 30)) bad("bucket_bytes", "must be in [1 KiB, 1 GiB]");
  if (s.first_bucket_bytes() < 1024 || s.first_bucket_bytes() > s.bucket_bytes()) {
    bad("first_bucket_bytes", "must be in [1 KiB, bucket_bytes]");
  }
  if (!v1::Device_IsValid(s.device())) bad("device", "unknown device");
  if (!v1::Precision_IsValid(s.precision())) {
    bad("precision", "unknown precision");
  } else if (s.device() == v1::DEVICE_CPU && s.precision() != v1::PRECISION_FP32 &&
             s.precision() != v1::PRECISION_BF16) {
    bad("precision", "the CPU device trains in FP32 or BF16");
  }
  if (s.min_workers() < 1 || s.min_workers() > s.world_size()) {
    bad("min_workers", absl::StrCat("must be in [1, world_size=", s.world_size(), "]"));
  }
  if (s.max_workers() < s.world_size() || s.max_workers() > 65536) {
    bad("max_workers", absl::StrCat("must be in [world_size=", s.world_size(), ", 65536]"));
  }
  if (s.max_recoveries() > 1000000) bad("max_recoveries", "must be <= 1000000");
  if (!Finite(s.collective_timeout_s()) || s.collective_timeout_s() <= 0 || s.collective_timeout_s() > 86400) {
    bad("collective_timeout_s", "must be in (0, 86400]");
  }
  if (s.concurrent_allreduces() < 1 || s.concurrent_allreduces() > 8) bad("concurrent_allreduces", "must be in [1, 8]");
  if (!evaluate && s.world_size() >= 1 && s.per_worker_batch() >= 1 && s.virtual_workers_per_worker() >= 1 &&
      d.train_examples() > 0) {
    uint64_t kn = GlobalBatch(s, std::max(s.world_size(), s.max_workers()));
    if (d.train_examples() < kn) {
      bad("dataset.train_examples",
          absl::StrCat(d.train_examples(), " examples are fewer than one global batch (kn=", kn, ")"));
    }
  }
  return e;
}

absl::Status ValidateJobSpec(const v1::JobSpec& spec) {
  auto errors = JobSpecErrors(spec);
  if (errors.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("invalid job spec (", errors.size(), " error", errors.size() > 1 ? "s" : "",
                   "): ", absl::StrJoin(errors, "; ")));
}

absl::Status ParseProtoText(const std::string& path, const std::string& contents, google::protobuf::Message* message) {
  const std::string type = message->GetDescriptor()->name();
  bool json;
  if (absl::EndsWith(path, ".json")) {
    json = true;
  } else if (absl::EndsWith(path, ".textproto") || absl::EndsWith(path, ".txtpb") ||
             absl::EndsWith(path, ".pbtxt")) {
    json = false;
  } else {
    auto stripped = absl::StripLeadingAsciiWhitespace(contents);
    json = !stripped.empty() && stripped[0] == '{';
  }
  if (json) {
    google::protobuf::util::JsonParseOptions opts;
    opts.ignore_unknown_fields = false;
    auto st = google::protobuf::util::JsonStringToMessage(contents, message, opts);
    if (!st.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", path, "' is not a valid JSON ", type, ": ", st.message().ToString()));
    }
    return absl::OkStatus();
  }
  google::protobuf::TextFormat::Parser parser;
  CollectErrors errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(contents, message)) {
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is not a valid text-format ", type, ": ",
                                                   absl::StrJoin(errors.errors, "; ")));
  }
  return absl::OkStatus();
}

std::string ProtoToJson(const google::protobuf::Message& m, bool pretty) {
  std::string out;
  google::protobuf::util::JsonPrintOptions opts;
  opts.add_whitespace = pretty;
  opts.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, opts);
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

absl::StatusOr<v1::JobSpec> ParseJobSpec(const std::string& path, const std::string& contents) {
  v1::JobSpec spec;
  auto st = ParseProtoText(path, contents, &spec);
  if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat("job file ", st.message()));
  return spec;
}

absl::StatusOr<v1::JobSpec> ReadJobFile(const std::string& path) {
  auto contents = ReadFileToString(path);
  if (!contents.ok()) return contents.status();
  if (contents->size() > (4u << 20)) {
    return absl::InvalidArgumentError(absl::StrCat("job file '", path, "' is larger than 4 MiB"));
  }
  return ParseJobSpec(path, *contents);
}

v1::Schedule MakeSchedule(const v1::JobSpec& spec, uint32_t world_size) {
  v1::Schedule s;
  const uint64_t kn = GlobalBatch(spec, world_size);
  s.set_base_lr(spec.base_lr());
  s.set_reference_batch(spec.reference_batch());
  s.set_global_batch(kn);
  s.set_lr_scaling(spec.lr_scaling() == v1::LR_SCALING_UNSPECIFIED ? v1::LR_SCALING_LINEAR : spec.lr_scaling());
  s.set_warmup(spec.warmup());
  s.set_warmup_epochs(spec.warmup() == v1::WARMUP_NONE ? 0 : spec.warmup_epochs());
  for (uint32_t e : spec.lr_decay_epochs()) s.add_decay_epochs(e);
  s.set_decay_factor(spec.lr_decay_factor());
  const uint64_t ipe = kn == 0 ? 0 : spec.dataset().train_examples() / kn;
  s.set_iterations_per_epoch(ipe);
  s.set_epochs(spec.epochs());
  s.set_total_iterations(ipe * spec.epochs());
  s.set_momentum(spec.momentum());
  s.set_nesterov(spec.nesterov());
  s.set_weight_decay(spec.weight_decay());
  s.set_weight_decay_on_bn(spec.weight_decay_on_bn());
  s.set_peak_lr(PeakLearningRate(ScheduleParams(s)));
  return s;
}

LrScheduleParams ScheduleParams(const v1::Schedule& s) {
  LrScheduleParams p;
  p.base_lr = s.base_lr();
  p.reference_batch = s.reference_batch();
  p.global_batch = s.global_batch();
  switch (s.lr_scaling()) {
    case v1::LR_SCALING_NONE: p.scaling = LrScaling::kNone; break;
    case v1::LR_SCALING_SQRT: p.scaling = LrScaling::kSqrt; break;
    default: p.scaling = LrScaling::kLinear; break;
  }
  switch (s.warmup()) {
    case v1::WARMUP_NONE: p.warmup = Warmup::kNone; break;
    case v1::WARMUP_CONSTANT: p.warmup = Warmup::kConstant; break;
    default: p.warmup = Warmup::kGradual; break;
  }
  p.warmup_epochs = s.warmup_epochs();
  p.decay_epochs.assign(s.decay_epochs().begin(), s.decay_epochs().end());
  p.decay_factor = s.decay_factor();
  p.iterations_per_epoch = s.iterations_per_epoch();
  p.rewarm_start = s.rewarm_start_iteration();
  p.rewarm_iterations = s.rewarm_iterations();
  p.rewarm_from = s.rewarm_from_lr();
  return p;
}

}  // namespace lmsgd
