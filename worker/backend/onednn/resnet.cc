#include "worker/backend/onednn/net.h"

#include "absl/strings/str_format.h"
#include "common/status_macros.h"

namespace lmsgd::backend::onednn {
namespace detail {

absl::Status Net::Guard(const std::function<void()>& fn, const char* what) {
  try {
    fn();
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat(__FILE__, ": oneDNN error in ", what, " at layer '", where_,
                                            "': ", e.what(), " (dnnl_status ", static_cast<int>(e.status), ")"));
  }
  return absl::OkStatus();
}

memory Net::Scratch(const memory::desc& md, int which) {
  scratch_bytes_[which] = std::max(scratch_bytes_[which], md.get_size());
  scratch_mems_.emplace_back(md, eng_, static_cast<void*>(nullptr));
  return scratch_mems_.back();  // memory is a shared handle: the copy refers to the same object
}


}  // namespace detail

absl::Status CheckPrecision(Precision precision) {
  if (precision == Precision::kFp32) return absl::OkStatus();
  if (precision == Precision::kTf32) {
    return absl::InvalidArgumentError("precision tf32 is a GPU format; the CPU backend trains in fp32 or bf16");
  }
  // bf16 convolutions need the AVX512-BF16 dot products: without them oneDNN would emulate them,
  // slower than fp32, so the choice is refused rather than made silently slow.
  const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  const auto bf16_isa = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_bf16);
  if ((isa & bf16_isa) != bf16_isa) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "precision bf16 on the CPU needs AVX512-BF16 (oneDNN's ISA here is 0x%x); train in fp32 instead", isa));
  }
  return absl::OkStatus();
}

int SetNumThreads(int threads) {
  if (threads <= 0) threads = omp_get_num_procs();
  omp_set_num_threads(threads);
  return threads;
}

absl::StatusOr<std::unique_ptr<Network>> CreateResNet(const model::ResNetSpec& spec, model::ParamStore* store,
                                                      const NetworkOptions& o) {
  if (o.batch < 1) return absl::InvalidArgumentError(absl::StrCat("batch ", o.batch, " must be >= 1"));
  if (o.training && (o.bn_group < 1 || o.batch % o.bn_group != 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bn_group ", o.bn_group, " must divide the batch ", o.batch));
  }
  RETURN_IF_ERROR(CheckPrecision(o.precision));
  auto net = std::make_unique<detail::Net>(spec, store, o);
  if (auto st = net->Build(); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat("building ", spec.name, " on oneDNN (batch ", o.batch, ", ",
                                                o.height, "x", o.width, "): ", st.message()));
  }
  return std::unique_ptr<Network>(std::move(net));
}


}  // namespace lmsgd::backend::onednn
