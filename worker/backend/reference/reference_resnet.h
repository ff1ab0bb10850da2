// A whole ResNet (from a ResNetSpec) forward and backward on the float64 reference ops: the
// definition of one training step's loss and gradients that the fast backends are checked
// against. Tests only; NCHW.
//
// Per block: out = x; for each (conv, bn) pair: out = bn(conv(out)), ReLU after all but the
// last; shortcut = downsample ? bn(conv_1x1(x)) : x; y = ReLU(out + shortcut).
// Stem: conv1 -> bn1 -> ReLU (-> 3x3/2 max pool). Head: global average pool -> fc ->
// softmax cross-entropy normalized by the global batch kn.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "worker/backend/reference/ops.h"
#include "worker/model/resnet.h"

namespace lmsgd::backend::reference {

using model::BlockSpec;
using model::BnSpec;
using model::ConvSpec;
using model::ResNetSpec;

class ReferenceResNet {
 public:
  // `params` holds every parameter (and BN buffer) by torchvision name.
  ReferenceResNet(ResNetSpec spec, const std::map<std::string, std::vector<float>>& params);

  // Training-mode forward: BN statistics per group of `bn_group` samples. Returns the loss
  // normalized by `normalizer` (kn) and keeps what Backward needs.
  double Forward(const Tensor& x, const std::vector<int>& labels, int bn_group, double normalizer);
  // Gradients of the last Forward's loss for every parameter, by name.
  std::map<std::string, std::vector<double>> Backward();

  // Inference-mode logits (N, classes): BN with the running statistics in params.
  Tensor Predict(const Tensor& x) const;

  std::map<std::string, std::vector<double>>& params() { return params_; }

 private:
  struct ConvBnCache {
    Tensor in, conv_out, bn_out;
    BnSaved saved;
  };
  struct BlockCache {
    std::vector<ConvBnCache> layers;
    ConvBnCache downsample;
    Tensor in, sum_relu;  // block input; ReLU(out + shortcut)
  };
  Tensor ConvBn(const ConvSpec& conv, const BnSpec& bn, const Tensor& in, bool relu,
                           ConvBnCache* cache);
  Tensor ConvBnBackward(const ConvSpec& conv, const BnSpec& bn, Tensor dout,
                                   const ConvBnCache& cache, bool relu);
  Tensor Weight(const std::string& name, std::vector<int> shape) const;
  Tensor ConvBnInference(const ConvSpec& conv, const BnSpec& bn, const Tensor& in,
                                    bool relu) const;

  ResNetSpec spec_;
  std::map<std::string, std::vector<double>> params_;
  std::map<std::string, std::vector<double>> grads_;
  int bn_group_ = 1;
  // Forward caches.
  ConvBnCache stem_;
  Tensor stem_relu_;
  std::vector<int64_t> pool_argmax_;
  std::vector<BlockCache> blocks_;
  Tensor features_, pooled_, dlogits_;
};

}  // namespace lmsgd::backend::reference
