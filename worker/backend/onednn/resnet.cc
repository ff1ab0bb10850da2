#include "worker/backend/onednn/net.h"

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
  auto net = std::make_unique<detail::Net>(spec, store, o);
  if (auto st = net->Build(); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat("building ", spec.name, " on oneDNN (batch ", o.batch, ", ",
                                                o.height, "x", o.width, "): ", st.message()));
  }
  return std::unique_ptr<Network>(std::move(net));
}


}  // namespace lmsgd::backend::onednn
