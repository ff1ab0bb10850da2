// ResNet architectures as data: the layers, their torchvision parameter names and shapes, and
// the paper's initialization. The forward/backward engine (worker/backend) walks this spec.
//
// ImageNet ResNets (18/34/50) follow torchvision exactly, with ResNet-50 as in the paper: the
// bottleneck's stride 2 sits on the 3x3 conv ("ResNet-50 v1.5", fb.resnet.torch), 25,557,032
// parameters. CIFAR-style ResNets (20, and 8 for tests) have a 3x3 stem without max-pool and
// three stages of basic blocks with 16/32/64 channels (He et al. 2016, section 4.2), with
// 1x1-conv projection shortcuts where the shape changes.
//
// Initialization (Goyal et al. 2017, section 5.1 / paper.md item 9):
//   conv weights   He/MSRA normal, std = sqrt(2 / (k * k * out_channels)) (fan-out)
//   fc.weight      N(0, 0.01); fc.bias 0
//   BN gamma 1 and beta 0, except gamma = 0 for the LAST BN of every residual block
//   (bn2 of a basic block, bn3 of a bottleneck) so that each block starts as the identity.
//   BN running_mean 0, running_var 1.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/optim/sgd.h"

namespace lmsgd::model {

enum class Arch { kResNet18, kResNet34, kResNet50, kResNet20, kResNet8 };

struct ConvSpec {
  std::string name;  // parameter prefix: "<name>.weight"
  int in_channels = 0, out_channels = 0, kernel = 0, stride = 1, padding = 0;
};
struct BnSpec {
  std::string name;  // "<name>.weight", ".bias", ".running_mean", ".running_var", ".num_batches_tracked"
  int channels = 0;
  bool last_in_block = false;  // gamma initialized to 0 when zero_init_last_bn_gamma
};
// conv -> bn (-> relu) pairs; the last pair's output is added to the shortcut, then ReLU.
struct BlockSpec {
  std::string name;  // "layer2.0"
  std::vector<ConvSpec> convs;
  std::vector<BnSpec> bns;
  std::optional<ConvSpec> downsample_conv;  // "<name>.downsample.0"
  std::optional<BnSpec> downsample_bn;      // "<name>.downsample.1"
  int stride = 1;
};
struct ResNetSpec {
  Arch arch;
  std::string name;
  int in_channels = 3;
  int num_classes = 1000;
  ConvSpec stem_conv;  // "conv1"
  BnSpec stem_bn;      // "bn1"
  bool stem_maxpool = true;  // 3x3 stride-2 max pool after the stem (ImageNet models)
  std::vector<BlockSpec> blocks;
  int fc_in = 0;  // "fc"
};

absl::StatusOr<ResNetSpec> MakeResNet(Arch arch, int in_channels, int num_classes);

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  optim::ParamKind kind = optim::ParamKind::kWeight;
  int64_t numel() const;
};
// Trainable parameters in torchvision's state_dict order.
std::vector<TensorSpec> Parameters(const ResNetSpec& spec);
// BN buffers (running_mean, running_var; num_batches_tracked as a scalar) in state_dict order.
std::vector<TensorSpec> Buffers(const ResNetSpec& spec);
int64_t CountParameters(const ResNetSpec& spec);

struct InitOptions {
  uint64_t seed = 1;
  bool zero_init_last_bn_gamma = true;
};
// Parameters and buffers (num_batches_tracked excluded), by name, initialized as above.
// Deterministic in the seed.
std::map<std::string, std::vector<float>> InitializeParameters(const ResNetSpec& spec, const InitOptions& options);

}  // namespace lmsgd::model
