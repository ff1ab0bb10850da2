#include "worker/backend/reference/reference_resnet.h"

namespace lmsgd::backend::reference {


ReferenceResNet::ReferenceResNet(ResNetSpec spec, const std::map<std::string, std::vector<float>>& params)
    : spec_(std::move(spec)) {
  for (const auto& [name, v] : params) params_[name] = std::vector<double>(v.begin(), v.end());
}

Tensor ReferenceResNet::Weight(const std::string& name, std::vector<int> shape) const {
  Tensor t(std::move(shape));
  t.data = params_.at(name);
  return t;
}

Tensor ReferenceResNet::ConvBn(const ConvSpec& conv, const BnSpec& bn, const Tensor& in, bool relu, ConvBnCache* c) {
  c->in = in;
  c->conv_out = ConvForward(
      in, Weight(conv.name + ".weight", {conv.out_channels, conv.in_channels, conv.kernel, conv.kernel}),
      {conv.stride, conv.padding});
  c->bn_out = BatchNormTrainForward(c->conv_out, params_.at(bn.name + ".weight"),
                                               params_.at(bn.name + ".bias"), 1e-5, bn_group_, &c->saved);
  return relu ? ReluForward(c->bn_out) : c->bn_out;
}

Tensor ReferenceResNet::ConvBnBackward(const ConvSpec& conv, const BnSpec& bn, Tensor dout, const ConvBnCache& c,
                                       bool relu) {
  if (relu) dout = ReluBackward(dout, ReluForward(c.bn_out));
  std::vector<double> dgamma, dbeta;
  Tensor dconv = BatchNormBackward(dout, c.conv_out, params_.at(bn.name + ".weight"), c.saved, bn_group_,
                                              &dgamma, &dbeta);
  grads_[bn.name + ".weight"] = dgamma;
  grads_[bn.name + ".bias"] = dbeta;
  const Tensor w = Weight(conv.name + ".weight", {conv.out_channels, conv.in_channels, conv.kernel, conv.kernel});
  grads_[conv.name + ".weight"] =
      ConvBackwardWeights(c.in, dconv, {conv.stride, conv.padding}, conv.kernel, conv.kernel).data;
  return ConvBackwardData(dconv, w, {conv.stride, conv.padding}, c.in.shape[2], c.in.shape[3]);
}

double ReferenceResNet::Forward(const Tensor& x, const std::vector<int>& labels, int bn_group, double normalizer) {
  bn_group_ = bn_group;
  Tensor h = ConvBn(spec_.stem_conv, spec_.stem_bn, x, /*relu=*/true, &stem_);
  stem_relu_ = h;
  if (spec_.stem_maxpool) h = MaxPoolForward(h, 3, 2, 1, &pool_argmax_);
  blocks_.assign(spec_.blocks.size(), BlockCache{});
  for (size_t b = 0; b < spec_.blocks.size(); ++b) {
    const BlockSpec& blk = spec_.blocks[b];
    BlockCache& c = blocks_[b];
    c.in = h;
    c.layers.resize(blk.convs.size());
    Tensor out = h;
    for (size_t i = 0; i < blk.convs.size(); ++i) {
      out = ConvBn(blk.convs[i], blk.bns[i], out, /*relu=*/i + 1 < blk.convs.size(), &c.layers[i]);
    }
    Tensor shortcut = blk.downsample_conv ? ConvBn(*blk.downsample_conv, *blk.downsample_bn, h, false, &c.downsample) : h;
    c.sum_relu = ReluForward(Add(out, shortcut));
    h = c.sum_relu;
  }
  features_ = h;
  pooled_ = GlobalAvgPoolForward(h);
  Tensor logits = FcForward(pooled_, Weight("fc.weight", {spec_.num_classes, spec_.fc_in}),
                                       params_.at("fc.bias"));
  return SoftmaxCrossEntropy(logits, labels, normalizer, &dlogits_);
}

std::map<std::string, std::vector<double>> ReferenceResNet::Backward() {
  grads_.clear();
  Tensor dw;
  std::vector<double> db;
  Tensor dpooled = FcBackward(dlogits_, pooled_, Weight("fc.weight", {spec_.num_classes, spec_.fc_in}),
                                         &dw, &db);
  grads_["fc.weight"] = dw.data;
  grads_["fc.bias"] = db;
  dpooled.shape = {pooled_.shape[0], pooled_.shape[1], 1, 1};
  Tensor dh = GlobalAvgPoolBackward(dpooled, features_.shape);
  for (size_t b = spec_.blocks.size(); b-- > 0;) {
    const BlockSpec& blk = spec_.blocks[b];
    const BlockCache& c = blocks_[b];
    Tensor dsum = ReluBackward(dh, c.sum_relu);
    Tensor dout = dsum;
    for (size_t i = blk.convs.size(); i-- > 0;) {
      dout = ConvBnBackward(blk.convs[i], blk.bns[i], dout, c.layers[i], /*relu=*/i + 1 < blk.convs.size());
    }
    Tensor dshort = blk.downsample_conv ? ConvBnBackward(*blk.downsample_conv, *blk.downsample_bn, dsum, c.downsample, false)
                                        : dsum;
    dh = Add(dout, dshort);
  }
  if (spec_.stem_maxpool) dh = MaxPoolBackward(dh, pool_argmax_, stem_relu_.shape);
  (void)ConvBnBackward(spec_.stem_conv, spec_.stem_bn, dh, stem_, /*relu=*/true);
  return grads_;
}

Tensor ReferenceResNet::ConvBnInference(const ConvSpec& conv, const BnSpec& bn, const Tensor& in, bool relu) const {
  Tensor y = ConvForward(
      in, Weight(conv.name + ".weight", {conv.out_channels, conv.in_channels, conv.kernel, conv.kernel}),
      {conv.stride, conv.padding});
  y = BatchNormInference(y, params_.at(bn.name + ".weight"), params_.at(bn.name + ".bias"),
                                    params_.at(bn.name + ".running_mean"), params_.at(bn.name + ".running_var"), 1e-5);
  return relu ? ReluForward(y) : y;
}

Tensor ReferenceResNet::Predict(const Tensor& x) const {
  Tensor h = ConvBnInference(spec_.stem_conv, spec_.stem_bn, x, true);
  std::vector<int64_t> argmax;
  if (spec_.stem_maxpool) h = MaxPoolForward(h, 3, 2, 1, &argmax);
  for (const BlockSpec& blk : spec_.blocks) {
    Tensor out = h;
    for (size_t i = 0; i < blk.convs.size(); ++i) {
      out = ConvBnInference(blk.convs[i], blk.bns[i], out, i + 1 < blk.convs.size());
    }
    Tensor shortcut = blk.downsample_conv ? ConvBnInference(*blk.downsample_conv, *blk.downsample_bn, h, false) : h;
    h = ReluForward(Add(out, shortcut));
  }
  return FcForward(GlobalAvgPoolForward(h),
                              Weight("fc.weight", {spec_.num_classes, spec_.fc_in}), params_.at("fc.bias"));
}

}  // namespace lmsgd::backend::reference
