#include "worker/comm/ucx_transport.h"

#include <poll.h>
#include <ucp/api/ucp.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace lmsgd::comm {
namespace {

// UCX status -> absl::Status at the call site, with UCX's message.
#define UCX_STATUS(expr, what)                                                                           \
  ([&]() -> absl::Status {                                                                               \
    const ucs_status_t _s = (expr);                                                                      \
    if (_s == UCS_OK) return absl::OkStatus();                                                           \
    return absl::InternalError(absl::StrCat(__FILE__, ":", __LINE__, ": ", what, ": ", ucs_status_string(_s))); \
  }())

}  // namespace

struct UcxTransport::Impl {
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  int efd = -1;
  std::vector<ucp_ep_h> eps;
  // Per-peer failure reported by the endpoint error handler (UCS_OK = healthy).
  std::vector<ucs_status_t> peer_status;
  struct ErrArg {
    Impl* impl;
    int peer;
  };
  std::vector<std::unique_ptr<ErrArg>> err_args;
  // Set when a SendRecv failed: sends may still be outstanding (UCX cannot cancel a send), so
  // endpoints must be force-closed, which completes them, before the worker is destroyed.
  bool broken = false;

  static void OnEndpointError(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* a = static_cast<ErrArg*>(arg);
    a->impl->peer_status[a->peer] = status;
  }

  // Drains progress, then sleeps on the event fd for at most 1 ms when nothing happened.
  void ProgressOrSleep() {
    if (ucp_worker_progress(worker) != 0) return;
    if (efd < 0) return;
    const ucs_status_t s = ucp_worker_arm(worker);
    if (s == UCS_OK) {
      pollfd p{efd, POLLIN, 0};
      (void)poll(&p, 1, 1);
    }
  }

  // Closes every endpoint: flushed (our last sends reach their peers even when we leave first),
  // forced after a failure or when the peer failed; bounded by 2 s in total either way.
  ~Impl() {
    std::vector<ucs_status_ptr_t> pending;
    for (size_t i = 0; i < eps.size(); ++i) {
      if (eps[i] == nullptr) continue;
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      param.flags = (!broken && peer_status[i] == UCS_OK) ? 0 : UCP_EP_CLOSE_FLAG_FORCE;
      ucs_status_ptr_t req = ucp_ep_close_nbx(eps[i], &param);
      if (UCS_PTR_IS_PTR(req)) pending.push_back(req);
    }
    const absl::Time deadline = absl::Now() + absl::Seconds(2);
    for (ucs_status_ptr_t req : pending) {
      while (ucp_request_check_status(req) == UCS_INPROGRESS && absl::Now() < deadline) ucp_worker_progress(worker);
      ucp_request_free(req);  // released by UCX on completion if still in flight
    }
    if (worker) ucp_worker_destroy(worker);
    if (context) ucp_cleanup(context);
  }
};

absl::StatusOr<std::unique_ptr<UcxTransport>> UcxTransport::Create(int rank, int size, Store* store,
                                                                     const std::string& prefix, absl::Time deadline) {
  if (size < 1 || rank < 0 || rank >= size || size > 0xffff) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " of ", size));
  }
  auto t = std::unique_ptr<UcxTransport>(new UcxTransport());
  t->rank_ = rank;
  t->size_ = size;
  t->impl_ = std::make_unique<Impl>();
  Impl& im = *t->impl_;
  ucp_config_t* config = nullptr;
  if (auto st = UCX_STATUS(ucp_config_read(nullptr, nullptr, &config), "ucp_config_read"); !st.ok()) return st;
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
  ucs_status_t s = ucp_init(&params, config, &im.context);
  ucp_config_release(config);
  if (auto st = UCX_STATUS(s, "ucp_init"); !st.ok()) return st;
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  if (auto st = UCX_STATUS(ucp_worker_create(im.context, &wp, &im.worker), "ucp_worker_create"); !st.ok()) return st;
  if (ucp_worker_get_efd(im.worker, &im.efd) != UCS_OK) im.efd = -1;  // then: plain polling

  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;
  if (auto st = UCX_STATUS(ucp_worker_get_address(im.worker, &addr, &addr_len), "ucp_worker_get_address"); !st.ok()) {
    return st;
  }
  const std::string mine(reinterpret_cast<const char*>(addr), addr_len);
  ucp_worker_release_address(im.worker, addr);
  if (auto st = store->Set(absl::StrCat(prefix, "/ucx/", rank), mine); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat("publishing rank ", rank, "'s UCX address: ", st.message()));
  }
  im.eps.assign(size, nullptr);
  im.peer_status.assign(size, UCS_OK);
  for (int peer = 0; peer < size; ++peer) {
    auto remote = store->Get(absl::StrCat(prefix, "/ucx/", peer), deadline);
    if (!remote.ok()) {
      return absl::Status(remote.status().code(),
                          absl::StrCat("rank ", rank, " waiting for rank ", peer, "'s UCX address: ",
                                       remote.status().message()));
    }
    im.err_args.push_back(std::make_unique<Impl::ErrArg>(Impl::ErrArg{&im, peer}));
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(remote->data());
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = &Impl::OnEndpointError;
    ep.err_handler.arg = im.err_args.back().get();
    if (auto st = UCX_STATUS(ucp_ep_create(im.worker, &ep, &im.eps[peer]), absl::StrCat("ucp_ep_create to rank ", peer));
        !st.ok()) {
      return st;
    }
  }
  return t;
}

UcxTransport::~UcxTransport() = default;

absl::Status UcxTransport::SendRecv(int to, const void* send, size_t send_bytes, int from, void* recv,
                                    size_t recv_bytes, uint64_t tag, absl::Time deadline, const char* what) {
  Impl& im = *impl_;
  if ((to >= size_) || (from >= size_)) return absl::InvalidArgumentError(absl::StrCat(what, ": bad peer"));
  ucs_status_ptr_t sreq = nullptr, rreq = nullptr;
  ucs_status_t recv_status = UCS_OK;
  size_t received = 0;
  if (from >= 0) {
    ucp_request_param_t p{};
    rreq = ucp_tag_recv_nbx(im.worker, recv, recv_bytes, (tag << 16) | static_cast<uint64_t>(from), ~uint64_t{0}, &p);
    if (UCS_PTR_IS_ERR(rreq)) {
      return absl::InternalError(absl::StrCat(what, ": receive from rank ", from, ": ",
                                              ucs_status_string(UCS_PTR_STATUS(rreq))));
    }
  }
  if (to >= 0) {
    ucp_request_param_t p{};
    sreq = ucp_tag_send_nbx(im.eps[to], send, send_bytes, (tag << 16) | static_cast<uint64_t>(rank_), &p);
    if (UCS_PTR_IS_ERR(sreq)) {
      const ucs_status_t e = UCS_PTR_STATUS(sreq);
      if (UCS_PTR_IS_PTR(rreq)) {
        ucp_request_cancel(im.worker, rreq);
        ucp_request_free(rreq);
      }
      im.broken = true;
      return absl::UnavailableError(absl::StrCat(what, ": send to rank ", to, ": ", ucs_status_string(e)));
    }
  }
  auto done = [&](ucs_status_ptr_t r) { return !UCS_PTR_IS_PTR(r) || ucp_request_check_status(r) != UCS_INPROGRESS; };
  absl::Status result;
  while (!(done(sreq) && done(rreq))) {
    if (aborted_.load()) {
      result = absl::AbortedError(absl::StrCat(what, ": communicator aborted"));
    } else if (to >= 0 && im.peer_status[to] != UCS_OK) {
      result = absl::UnavailableError(
          absl::StrCat(what, ": rank ", to, " failed (", ucs_status_string(im.peer_status[to]), ")"));
    } else if (from >= 0 && im.peer_status[from] != UCS_OK) {
      result = absl::UnavailableError(
          absl::StrCat(what, ": rank ", from, " failed (", ucs_status_string(im.peer_status[from]), ")"));
    } else if (absl::Now() > deadline) {
      const int peer = !done(rreq) ? from : to;
      result = absl::DeadlineExceededError(absl::StrCat(what, ": timed out waiting for rank ", peer,
                                                        !done(rreq) ? " to send" : " to receive"));
    }
    if (!result.ok()) break;
    im.ProgressOrSleep();
  }
  // Completion statuses; cancel whatever is still pending (after an error).
  for (ucs_status_ptr_t* r : {&sreq, &rreq}) {
    if (!UCS_PTR_IS_PTR(*r)) continue;
    if (ucp_request_check_status(*r) == UCS_INPROGRESS) {
      ucp_request_cancel(im.worker, *r);
      for (int i = 0; i < 1000 && ucp_request_check_status(*r) == UCS_INPROGRESS; ++i) ucp_worker_progress(im.worker);
    }
    const ucs_status_t st = ucp_request_check_status(*r);
    if (r == &rreq) {
      ucp_tag_recv_info_t info{};
      if (st == UCS_OK && ucp_tag_recv_request_test(*r, &info) == UCS_OK) received = info.length;
      recv_status = st;
    } else if (result.ok() && st != UCS_OK) {
      result = absl::UnavailableError(absl::StrCat(what, ": send to rank ", to, ": ", ucs_status_string(st)));
    }
    if (ucp_request_check_status(*r) != UCS_INPROGRESS) ucp_request_free(*r);
  }
  if (!result.ok()) {
    im.broken = true;
    return result;
  }
  if (UCS_PTR_IS_PTR(rreq) && recv_status != UCS_OK) {
    im.broken = true;
    return absl::UnavailableError(
        absl::StrCat(what, ": receive from rank ", from, ": ", ucs_status_string(recv_status)));
  }
  if (UCS_PTR_IS_PTR(rreq) && received != recv_bytes) {
    im.broken = true;
    return absl::DataLossError(absl::StrCat(what, ": rank ", from, " sent ", received, " bytes, expected ", recv_bytes));
  }
  return absl::OkStatus();
}

}  // namespace lmsgd::comm
