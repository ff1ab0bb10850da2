// Training checkpoints.
//
// A checkpoint named ckpt-<iteration, 10 digits> in the checkpoint directory is two files:
//   ckpt-N.safetensors        the model: every parameter and BN buffer under its torchvision
//                             name (num_batches_tracked as I64), so that
//                             torchvision.models.resnet50().load_state_dict(
//                                 safetensors.torch.load_file(path)) accepts it;
//   ckpt-N.optim.safetensors  the SGD velocity of every parameter (same names) and, in the
//                             metadata, the training state (iteration, epoch, seed, model,
//                             global batch, world size, learning rate).
// Both are written atomically (temp, fsync, rename) and carry a CRC-32 of their data; then the
// file LATEST (also atomic) is pointed at the new name: that rename is the commit point. A
// crash before it leaves the previous checkpoint current. After the commit, checkpoints older
// (by write time) than the newest `keep` are removed, except those named in `retain`: the one
// a coordinator has recorded as the job's and those whose report it has not acknowledged. A
// generation re-formed while the old rank 0 still writes resumes from the recorded one, so it
// must outlive any number of later saves. Write time, not the iteration in the name, orders
// them: after an elastic re-formation the iterations restart lower (a larger kn), and a dead
// generation's later files are older than the new generation's.
//
// Loading checks names, shapes, CRCs and that the model matches; any mismatch or corruption is
// an error naming the file, never a partial load (the store and optimizer are only written
// after everything has been verified).
#pragma once

#include <cstdint>
#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "worker/model/param_store.h"
#include "worker/optim/sgd.h"

namespace lmsgd::checkpoint {

struct TrainingState {
  uint64_t iteration = 0;  // steps completed
  uint32_t epoch = 0;      // epochs completed
  std::string model;       // "resnet50", ...
  uint64_t seed = 0;
  uint64_t global_batch = 0;
  uint32_t world_size = 1;
  double lr = 0;           // rate of the last step
};

// Writes checkpoint ckpt-<state.iteration> into `dir` (created if needed), commits it and
// applies the retention above (`retain`: model file paths or names). Returns the model file's
// path.
inline constexpr int kDefaultKeep = 3;
absl::StatusOr<std::string> SaveCheckpoint(const std::string& dir, const model::ParamStore& store,
                                           const optim::Sgd& sgd, const TrainingState& state, int keep = kDefaultKeep,
                                           const std::set<std::string>& retain = {});

// Path of the committed checkpoint's model file in `dir`; NOT_FOUND when there is none.
absl::StatusOr<std::string> LatestCheckpoint(const std::string& dir);

// Loads a checkpoint (its model file path; the optimizer file is its sibling) into `store` and
// `sgd` (may be null: weights only). Returns the training state.
absl::StatusOr<TrainingState> LoadCheckpoint(const std::string& model_path, const std::string& expected_model,
                                             model::ParamStore* store, optim::Sgd* sgd);

// Weights to start a job from (JobSpec.init_checkpoint): an lmsgd checkpoint's model file, or
// any safetensors file with torchvision's names (F32 tensors; num_batches_tracked optional,
// other tools' files need no CRC). Loads the parameters and BN buffers into `store` only after
// every tensor checked out; otherwise one INVALID_ARGUMENT lists every missing, unexpected and
// mis-shaped name. With `sgd` non-null the SGD momentum comes too, from the optimizer file
// beside an lmsgd checkpoint (FAILED_PRECONDITION naming the file when there is none).
struct InitState {
  bool has_training_state = false;  // an lmsgd checkpoint's optimizer file was found (`state` valid)
  TrainingState state;
};
absl::StatusOr<InitState> LoadInitCheckpoint(const std::string& path, const std::string& expected_model,
                                             model::ParamStore* store, optim::Sgd* sgd);

}  // namespace lmsgd::checkpoint
