#include "worker/model/resnet.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "worker/data/sampler.h"

namespace lmsgd::model {
namespace {

ConvSpec Conv(std::string name, int in, int out, int k, int stride) {
  return ConvSpec{std::move(name), in, out, k, stride, k / 2};
}

// Normal deviates from SplitMix64 via Box-Muller: portable across standard libraries.
class Normal {
 public:
  explicit Normal(uint64_t seed) : rng_(seed) {}
  double Next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1, u2;
    do {
      u1 = static_cast<double>(rng_.Next() >> 11) * 0x1.0p-53;
    } while (u1 <= 0.0);
    u2 = static_cast<double>(rng_.Next() >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2 * M_PI * u2);
    has_spare_ = true;
    return r * std::cos(2 * M_PI * u2);
  }

 private:
  data::SplitMix64 rng_;
  bool has_spare_ = false;
  double spare_ = 0;
};

uint64_t NameSeed(uint64_t seed, const std::string& name) {
  // FNV-1a of the name mixed with the seed: each tensor's values do not depend on the others.
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  return h ^ (seed * 0x9e3779b97f4a7c15ull);
}

}  // namespace

int64_t TensorSpec::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<ResNetSpec> MakeResNet(Arch arch, int in_channels, int num_classes) {
  if (in_channels < 1 || in_channels > 64) {
    return absl::InvalidArgumentError(absl::StrCat("in_channels=", in_channels, " must be in [1, 64]"));
  }
  if (num_classes < 2) return absl::InvalidArgumentError(absl::StrCat("num_classes=", num_classes, " must be >= 2"));
  ResNetSpec s;
  s.arch = arch;
  s.in_channels = in_channels;
  s.num_classes = num_classes;
  std::vector<int> depths;
  bool bottleneck = false;
  std::vector<int> widths;
  switch (arch) {
    case Arch::kResNet18: s.name = "resnet18"; depths = {2, 2, 2, 2}; widths = {64, 128, 256, 512}; break;
    case Arch::kResNet34: s.name = "resnet34"; depths = {3, 4, 6, 3}; widths = {64, 128, 256, 512}; break;
    case Arch::kResNet50:
      s.name = "resnet50"; depths = {3, 4, 6, 3}; widths = {64, 128, 256, 512}; bottleneck = true; break;
    case Arch::kResNet20: s.name = "resnet20"; depths = {3, 3, 3}; widths = {16, 32, 64}; break;
    case Arch::kResNet8: s.name = "resnet8"; depths = {1, 1, 1}; widths = {16, 32, 64}; break;
  }
  const bool cifar = arch == Arch::kResNet20 || arch == Arch::kResNet8;
  if (cifar) {
    s.stem_conv = Conv("conv1", in_channels, 16, 3, 1);
    s.stem_bn = BnSpec{"bn1", 16, false};
    s.stem_maxpool = false;
  } else {
    s.stem_conv = ConvSpec{"conv1", in_channels, 64, 7, 2, 3};
    s.stem_bn = BnSpec{"bn1", 64, false};
    s.stem_maxpool = true;
  }
  const int expansion = bottleneck ? 4 : 1;
  int channels = s.stem_conv.out_channels;
  for (size_t stage = 0; stage < depths.size(); ++stage) {
    const int width = widths[stage];
    for (int b = 0; b < depths[stage]; ++b) {
      BlockSpec blk;
      blk.name = absl::StrCat("layer", stage + 1, ".", b);
      blk.stride = (b == 0 && stage > 0) ? 2 : 1;
      const int out = width * expansion;
      if (bottleneck) {
        // Stride on the 3x3 conv (ResNet-50 v1.5).
        blk.convs = {Conv(blk.name + ".conv1", channels, width, 1, 1), Conv(blk.name + ".conv2", width, width, 3, blk.stride),
                     Conv(blk.name + ".conv3", width, out, 1, 1)};
        blk.bns = {{blk.name + ".bn1", width, false}, {blk.name + ".bn2", width, false}, {blk.name + ".bn3", out, true}};
      } else {
        blk.convs = {Conv(blk.name + ".conv1", channels, width, 3, blk.stride), Conv(blk.name + ".conv2", width, width, 3, 1)};
        blk.bns = {{blk.name + ".bn1", width, false}, {blk.name + ".bn2", width, true}};
      }
      if (blk.stride != 1 || channels != out) {
        blk.downsample_conv = ConvSpec{blk.name + ".downsample.0", channels, out, 1, blk.stride, 0};
        blk.downsample_bn = BnSpec{blk.name + ".downsample.1", out, false};
      }
      channels = out;
      s.blocks.push_back(std::move(blk));
    }
  }
  s.fc_in = channels;
  return s;
}

namespace {
void AddConv(std::vector<TensorSpec>& out, const ConvSpec& c) {
  out.push_back({c.name + ".weight", {c.out_channels, c.in_channels, c.kernel, c.kernel}, optim::ParamKind::kWeight});
}
void AddBn(std::vector<TensorSpec>& out, const BnSpec& b) {
  out.push_back({b.name + ".weight", {b.channels}, optim::ParamKind::kBnGamma});
  out.push_back({b.name + ".bias", {b.channels}, optim::ParamKind::kBnBeta});
}
void AddBnBuffers(std::vector<TensorSpec>& out, const BnSpec& b) {
  out.push_back({b.name + ".running_mean", {b.channels}, optim::ParamKind::kWeight});
  out.push_back({b.name + ".running_var", {b.channels}, optim::ParamKind::kWeight});
  out.push_back({b.name + ".num_batches_tracked", {}, optim::ParamKind::kWeight});
}
}  // namespace

std::vector<TensorSpec> Parameters(const ResNetSpec& s) {
  std::vector<TensorSpec> out;
  AddConv(out, s.stem_conv);
  AddBn(out, s.stem_bn);
  for (const auto& blk : s.blocks) {
    for (size_t i = 0; i < blk.convs.size(); ++i) {
      AddConv(out, blk.convs[i]);
      AddBn(out, blk.bns[i]);
    }
    if (blk.downsample_conv) {
      AddConv(out, *blk.downsample_conv);
      AddBn(out, *blk.downsample_bn);
    }
  }
  out.push_back({"fc.weight", {s.num_classes, s.fc_in}, optim::ParamKind::kWeight});
  out.push_back({"fc.bias", {s.num_classes}, optim::ParamKind::kBias});
  return out;
}

std::vector<TensorSpec> Buffers(const ResNetSpec& s) {
  std::vector<TensorSpec> out;
  AddBnBuffers(out, s.stem_bn);
  for (const auto& blk : s.blocks) {
    for (const auto& bn : blk.bns) AddBnBuffers(out, bn);
    if (blk.downsample_bn) AddBnBuffers(out, *blk.downsample_bn);
  }
  return out;
}

int64_t CountParameters(const ResNetSpec& s) {
  int64_t n = 0;
  for (const auto& p : Parameters(s)) n += p.numel();
  return n;
}

std::map<std::string, std::vector<float>> InitializeParameters(const ResNetSpec& s, const InitOptions& o) {
  std::map<std::string, std::vector<float>> out;
  std::map<std::string, bool> zero_gamma;
  auto note_bn = [&](const BnSpec& b) { zero_gamma[b.name + ".weight"] = o.zero_init_last_bn_gamma && b.last_in_block; };
  note_bn(s.stem_bn);
  for (const auto& blk : s.blocks) {
    for (const auto& bn : blk.bns) note_bn(bn);
    if (blk.downsample_bn) note_bn(*blk.downsample_bn);
  }
  for (const auto& p : Parameters(s)) {
    std::vector<float> v(static_cast<size_t>(p.numel()), 0.0f);
    Normal normal(NameSeed(o.seed, p.name));
    if (p.name == "fc.weight") {
      for (auto& x : v) x = static_cast<float>(0.01 * normal.Next());
    } else if (p.kind == optim::ParamKind::kWeight) {  // conv: He (MSRA), fan-out
      const double fan_out = static_cast<double>(p.shape[0] * p.shape[2] * p.shape[3]);
      const double std = std::sqrt(2.0 / fan_out);
      for (auto& x : v) x = static_cast<float>(std * normal.Next());
    } else if (p.kind == optim::ParamKind::kBnGamma) {
      std::fill(v.begin(), v.end(), zero_gamma[p.name] ? 0.0f : 1.0f);
    }  // BN beta and fc.bias: 0
    out[p.name] = std::move(v);
  }
  for (const auto& b : Buffers(s)) {
    if (b.shape.empty()) continue;  // num_batches_tracked
    const bool var = b.name.size() > 12 && b.name.compare(b.name.size() - 12, 12, ".running_var") == 0;
    out[b.name] = std::vector<float>(static_cast<size_t>(b.numel()), var ? 1.0f : 0.0f);
  }
  return out;
}

}  // namespace lmsgd::model
