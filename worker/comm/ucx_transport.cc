#include "worker/comm/ucx_transport.h"

#include <poll.h>
#include <sched.h>
#include <unistd.h>
#include <ucp/api/ucp.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "worker/comm/bf16_wire.h"
#include "worker/comm/reduce.h"
#include "common/status_macros.h"

namespace lmsgd::comm {
namespace {

// UCX status -> absl::Status at the call site, with UCX's message.
#define UCX_STATUS(expr, what)                                                                           \
  ([&]() -> absl::Status {                                                                               \
    const ucs_status_t _s = (expr);                                                                      \
    if (_s == UCS_OK) return absl::OkStatus();                                                           \
    return absl::InternalError(absl::StrCat(__FILE__, ":", __LINE__, ": ", what, ": ", ucs_status_string(_s))); \
  }())

// A kRecvAdd receive up to this size adds straight out of UCX's receive buffers (a generic
// datatype whose unpack is the addition); larger ones, which UCX may move by rendezvous, land in
// a contiguous buffer first and are added when complete. Equal to the eager limit on one host.
constexpr size_t kFusedAddMaxBytes = 256 << 10;

// UCX's generic-datatype callbacks for a fused kRecvAdd: the receive's "buffer" is its
// StreamAdder, which adds each fragment as UCX unpacks it. Never used to send.
struct AddOps {
  static void* StartPack(void*, const void*, size_t) { return nullptr; }
  static void* StartUnpack(void*, void* buffer, size_t) { return buffer; }
  static size_t PackedSize(void* state) { return state ? static_cast<StreamAdder*>(state)->expected() : 0; }
  static size_t Pack(void*, size_t, void*, size_t) { return 0; }
  static ucs_status_t Unpack(void* state, size_t offset, const void* src, size_t length) {
    static_cast<StreamAdder*>(state)->Add(offset, static_cast<const unsigned char*>(src), length);
    return UCS_OK;
  }
  static void Finish(void*) {}
};

// The bf16 wire's sends and receives (kSendBf16, kRecvBf16): float32 values converted as UCX
// packs them into its send buffers and unpacks them out of its receive buffers, so the
// conversion rides on the copy UCX makes anyway. `buf`: the float32 values; `bytes`: the
// message's (bf16) size. Detached after a failure: the buffer is no longer ours.
struct Bf16Message {
  float* buf = nullptr;
  size_t bytes = 0, done = 0;  // done: bytes unpacked (a receive), or how far packed (a send)
  bool overflow = false;
  bool round_in_place = true;  // a send without a hint: the sender keeps what it sent
  void Reset(float* b, size_t n, bool round) {
    buf = b;
    bytes = n;
    done = 0;
    overflow = false;
    round_in_place = round;
  }
  bool complete() const { return !overflow && done == bytes; }
};

struct Bf16Ops {
  static void* Start(void*, const void* buffer, size_t) { return const_cast<void*>(buffer); }
  static void* StartUnpack(void*, void* buffer, size_t) { return buffer; }
  static size_t PackedSize(void* state) { return static_cast<Bf16Message*>(state)->bytes; }
  static size_t Pack(void* state, size_t offset, void* dest, size_t max_length) {
    auto* m = static_cast<Bf16Message*>(state);
    if (offset >= m->bytes) return 0;
    const size_t n = std::min(max_length, m->bytes - offset);
    if (m->buf == nullptr) {
      std::memset(dest, 0, n);
    } else {
      PackBf16Piece(m->buf, offset, static_cast<unsigned char*>(dest), n, m->round_in_place);
    }
    m->done = std::max(m->done, offset + n);  // how far it packed: a piece packed again counts once
    return n;
  }
  static ucs_status_t Unpack(void* state, size_t offset, const void* src, size_t length) {
    auto* m = static_cast<Bf16Message*>(state);
    if (m->buf == nullptr) return UCS_OK;
    if (offset > m->bytes || length > m->bytes - offset) {
      m->overflow = true;
      return UCS_OK;
    }
    UnpackBf16Piece(static_cast<const unsigned char*>(src), offset, length, m->buf);
    m->done += length;
    return UCS_OK;
  }
  static size_t NoPack(void*, size_t, void*, size_t) { return 0; }
  static ucs_status_t NoUnpack(void*, size_t, const void*, size_t) { return UCS_ERR_UNSUPPORTED; }
  static void Finish(void*) {}
};

// Objects UCX may reference during an Exchange (generic-datatype states): reused from one
// Exchange to the next; after a failure they are retired, not freed (a cancelled receive or an
// unfinished send may still be referenced inside UCX), until the worker is gone.
template <typename T>
class StatePool {
 public:
  void Begin() { used_ = 0; }
  T* Next() {
    if (used_ == live_.size()) live_.push_back(std::make_unique<T>());
    return live_[used_++].get();
  }
  template <typename Fn>
  void Retire(Fn detach) {
    for (auto& s : live_) {
      detach(*s);
      retired_.push_back(std::move(s));
    }
    live_.clear();
    used_ = 0;
  }

 private:
  std::vector<std::unique_ptr<T>> live_, retired_;
  size_t used_ = 0;
};

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
  // The generic datatypes of fused kRecvAdd receives and of the bf16 wire, and their states.
  ucp_datatype_t add_dt = 0, bf16_send_dt = 0, bf16_recv_dt = 0;
  bool have_add_dt = false, have_bf16_send_dt = false, have_bf16_recv_dt = false;
  StatePool<StreamAdder> add_states;
  StatePool<Bf16Message> bf16_states;
  std::vector<float> add_staging;  // kRecvAdd receives above kFusedAddMaxBytes land here

  static void OnEndpointError(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* a = static_cast<ErrArg*>(arg);
    a->impl->peer_status[a->peer] = status;
  }

  // Drains progress. Idle up to 50 us: spin (shared-memory latency). Idle up to 2 ms: yield the
  // core after each poll (peers sharing the core get to run: oversubscribed hosts). Longer: sleep
  // on the worker's event fd for at most 1 ms, so that a communication thread waiting for a late
  // bucket leaves the cores to the backward pass.
  void ProgressOrSleep() {
    if (ucp_worker_progress(worker) != 0) {
      idle_since = std::chrono::steady_clock::now();
      return;
    }
    const auto idle = std::chrono::steady_clock::now() - idle_since;
    if (idle < spin_for) return;
    if (idle < std::chrono::milliseconds(2) || efd < 0) {
      sched_yield();
      return;
    }
    if (ucp_worker_arm(worker) == UCS_OK) {
      pollfd p{efd, POLLIN, 0};
      (void)poll(&p, 1, 1);
    }
  }
  std::chrono::steady_clock::time_point idle_since = std::chrono::steady_clock::now();
  // No spinning when this host runs more ranks than it has cores: the peer a rank waits for
  // may need this very core (yield at once instead).
  std::chrono::microseconds spin_for{50};

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
    if (have_add_dt) ucp_dt_destroy(add_dt);
    if (have_bf16_send_dt) ucp_dt_destroy(bf16_send_dt);
    if (have_bf16_recv_dt) ucp_dt_destroy(bf16_recv_dt);
    if (context) ucp_cleanup(context);
  }
};

absl::StatusOr<std::unique_ptr<UcxTransport>> UcxTransport::Create(int rank, int size, Store* store,
                                                                     const std::string& prefix, absl::Time deadline,
                                                                     bool single_host, const std::string& host_name,
                                                                     int lane) {
  if (size < 1 || rank < 0 || rank >= size || size > 0xffff) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " of ", size));
  }
  if (lane < 0) return absl::InvalidArgumentError(absl::StrCat("lane ", lane));
  const std::string key_name = lane == 0 ? "ucx" : absl::StrCat("ucx-lane", lane);
  auto t = std::unique_ptr<UcxTransport>(new UcxTransport());
  t->rank_ = rank;
  t->size_ = size;
  t->impl_ = std::make_unique<Impl>();
  Impl& im = *t->impl_;
  ucp_config_t* config = nullptr;
  RETURN_IF_ERROR(UCX_STATUS(ucp_config_read(nullptr, nullptr, &config), "ucp_config_read"));
  // Default transports: never CMA, which measured slower than shared-memory copies
  // (docs/benchmarks.md); and when every rank is on this host, no TCP either (UCX would
  // stripe large messages over TCP and shared memory, halving the bandwidth). UCX_TLS in the
  // environment wins.
  if (std::getenv("UCX_TLS") == nullptr) {
    (void)ucp_config_modify(config, "TLS", single_host ? "^cma,tcp" : "^cma");
  }
  // On one host without CMA, UCX's rendezvous protocol moves the data through the same
  // shared-memory FIFO as eager sends, after an extra request/reply handshake, which its automatic
  // threshold makes 16-64 KiB messages pay (docs/benchmarks.md). Eager up to 256 KiB;
  // UCX_RNDV_THRESH wins.
  if (single_host && std::getenv("UCX_RNDV_THRESH") == nullptr) {
    (void)ucp_config_modify(config, "RNDV_THRESH", "256K");
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
  ucs_status_t s = ucp_init(&params, config, &im.context);
  ucp_config_release(config);
  RETURN_IF_ERROR(UCX_STATUS(s, "ucp_init"));
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  RETURN_IF_ERROR(UCX_STATUS(ucp_worker_create(im.context, &wp, &im.worker), "ucp_worker_create"));
  if (ucp_worker_get_efd(im.worker, &im.efd) != UCS_OK) im.efd = -1;  // then: plain polling
  static const ucp_generic_dt_ops_t kAddOps = {&AddOps::StartPack, &AddOps::StartUnpack, &AddOps::PackedSize,
                                               &AddOps::Pack,      &AddOps::Unpack,      &AddOps::Finish};
  RETURN_IF_ERROR(UCX_STATUS(ucp_dt_create_generic(&kAddOps, nullptr, &im.add_dt), "ucp_dt_create_generic (receive-and-add)"));
  im.have_add_dt = true;
  static const ucp_generic_dt_ops_t kBf16SendOps = {&Bf16Ops::Start, &Bf16Ops::StartUnpack, &Bf16Ops::PackedSize,
                                                    &Bf16Ops::Pack,  &Bf16Ops::NoUnpack,    &Bf16Ops::Finish};
  static const ucp_generic_dt_ops_t kBf16RecvOps = {&Bf16Ops::Start, &Bf16Ops::StartUnpack, &Bf16Ops::PackedSize,
                                                    &Bf16Ops::NoPack, &Bf16Ops::Unpack,     &Bf16Ops::Finish};
  RETURN_IF_ERROR(UCX_STATUS(ucp_dt_create_generic(&kBf16SendOps, nullptr, &im.bf16_send_dt), "ucp_dt_create_generic (bf16 send)"));
  im.have_bf16_send_dt = true;
  RETURN_IF_ERROR(UCX_STATUS(ucp_dt_create_generic(&kBf16RecvOps, nullptr, &im.bf16_recv_dt), "ucp_dt_create_generic (bf16 receive)"));
  im.have_bf16_recv_dt = true;

  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;
  RETURN_IF_ERROR(UCX_STATUS(ucp_worker_get_address(im.worker, &addr, &addr_len), "ucp_worker_get_address"));
  // Published value: "<hostname>\n<ucp address bytes>".
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  const std::string my_host = host_name.empty() ? std::string(host) : host_name;
  const std::string mine = my_host + "\n" + std::string(reinterpret_cast<const char*>(addr), addr_len);
  ucp_worker_release_address(im.worker, addr);
  if (auto st = store->Set(absl::StrCat(prefix, "/", key_name, "/", rank), mine); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat("publishing rank ", rank, "'s UCX address: ", st.message()));
  }
  im.eps.assign(size, nullptr);
  im.peer_status.assign(size, UCS_OK);
  for (int peer = 0; peer < size; ++peer) {
    auto remote = store->Get(absl::StrCat(prefix, "/", key_name, "/", peer), deadline);
    if (!remote.ok()) {
      return absl::Status(remote.status().code(),
                          absl::StrCat("rank ", rank, " waiting for rank ", peer, "'s UCX address: ",
                                       remote.status().message()));
    }
    const size_t nl = remote->find('\n');
    if (nl == std::string::npos) {
      return absl::DataLossError(absl::StrCat("rank ", peer, "'s published UCX address is malformed"));
    }
    const std::string peer_host = remote->substr(0, nl);
    const std::string peer_addr = remote->substr(nl + 1);
    im.err_args.push_back(std::make_unique<Impl::ErrArg>(Impl::ErrArg{&im, peer}));
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(peer_addr.data());
    // Peer error handling restricts UCX to transports that can report a dead peer (TCP), which
    // rules out shared memory. Same-host peers use shared memory without it (a dead or stalled
    // local peer is caught by the collective's deadline); other hosts get PEER mode.
    ep.err_mode = peer_host == my_host ? UCP_ERR_HANDLING_MODE_NONE : UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = &Impl::OnEndpointError;
    ep.err_handler.arg = im.err_args.back().get();
    RETURN_IF_ERROR(UCX_STATUS(ucp_ep_create(im.worker, &ep, &im.eps[peer]), absl::StrCat("ucp_ep_create to rank ", peer, " on ", peer_host)));
  }
  return t;
}

UcxTransport::~UcxTransport() = default;

// TCP moves a message that UCX packs itself (the bf16 wire's generic datatypes) in fragments of
// its segment size, a send() and a receive each: UCX's 8 KiB default leaves the wire idle between
// small fragments. Over a shaped link 2 MiB was best for both dtypes (512 KiB and 1 MiB slowed
// float32's ring, 256 KiB bf16's, 4 MiB gained nothing; docs/benchmarks.md). Set with
// ucp_config_modify they had no effect (UCX 1.13), hence the environment; the variables win.
void SetUcxEnvironmentDefaults() {
  setenv("UCX_TCP_TX_SEG_SIZE", "2M", /*overwrite=*/0);
  setenv("UCX_TCP_RX_SEG_SIZE", "2M", /*overwrite=*/0);
}

absl::Status UcxTransport::Exchange(const std::vector<P2POp>& ops, absl::Time deadline, const char* what) {
  Impl& im = *impl_;
  for (const P2POp& op : ops) {
    if (op.peer < 0 || op.peer >= size_) return absl::InvalidArgumentError(absl::StrCat(what, ": bad peer ", op.peer));
    const bool bf16 = op.kind == P2POp::kSendBf16 || op.kind == P2POp::kRecvBf16 || op.kind == P2POp::kRecvAddBf16;
    if ((op.kind == P2POp::kRecvAdd && op.bytes % sizeof(float) != 0) || (bf16 && op.bytes % sizeof(uint16_t) != 0)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": ", op.is_send() ? "send to" : "receive from", " rank ",
                                                     op.peer, " of ", op.bytes, " bytes (not whole values)"));
    }
  }
  auto describe = [](const P2POp& op) { return op.is_send() ? "send to" : "receive from"; };
  // Per operation: its UCX request; a fused receive-and-add's adder, or its place in add_staging
  // (kRecvAdd above kFusedAddMaxBytes); a bf16 send's or receive's message state.
  struct Pending {
    ucs_status_ptr_t req = nullptr;
    bool finished = false;
    StreamAdder* adder = nullptr;
    size_t staged_at = SIZE_MAX;
    Bf16Message* bf16 = nullptr;
  };
  std::vector<Pending> pend(ops.size());
  im.add_states.Begin();
  im.bf16_states.Begin();
  size_t staged_floats = 0;
  for (size_t i = 0; i < ops.size(); ++i) {
    const P2POp& op = ops[i];
    if (op.kind == P2POp::kSendBf16 || op.kind == P2POp::kRecvBf16) {
      pend[i].bf16 = im.bf16_states.Next();
      pend[i].bf16->Reset(static_cast<float*>(op.buf), op.bytes, op.hint == P2POp::kNoHint);
      continue;
    }
    const bool bf16 = op.kind == P2POp::kRecvAddBf16;
    if (op.kind != P2POp::kRecvAdd && !bf16) continue;
    if (bf16 || op.bytes <= kFusedAddMaxBytes) {
      pend[i].adder = im.add_states.Next();
      pend[i].adder->Reset(static_cast<float*>(op.buf), op.bytes, bf16, op.hint == P2POp::kFinal);
    } else {
      pend[i].staged_at = staged_floats;
      staged_floats += op.bytes / sizeof(float);
    }
  }
  if (im.add_staging.size() < staged_floats) im.add_staging.resize(staged_floats);
  absl::Status result;
  // Receives first, so that a peer's eager send finds its match posted.
  for (int pass = 0; pass < 2 && result.ok(); ++pass) {
    for (size_t i = 0; i < ops.size() && result.ok(); ++i) {
      const P2POp& op = ops[i];
      ucs_status_ptr_t& req = pend[i].req;
      ucp_request_param_t p{};
      const uint64_t recv_tag = (op.tag << 16) | static_cast<uint64_t>(op.peer);
      if (pass == 0 && op.kind == P2POp::kRecv) {
        req = ucp_tag_recv_nbx(im.worker, op.buf, op.bytes, recv_tag, ~uint64_t{0}, &p);
      } else if (pass == 0 && op.kind == P2POp::kRecvBf16) {
        p.op_attr_mask = UCP_OP_ATTR_FIELD_DATATYPE;
        p.datatype = im.bf16_recv_dt;
        req = ucp_tag_recv_nbx(im.worker, pend[i].bf16, op.bytes, recv_tag, ~uint64_t{0}, &p);
      } else if (pass == 1 && op.kind == P2POp::kSendBf16) {
        p.op_attr_mask = UCP_OP_ATTR_FIELD_DATATYPE;
        p.datatype = im.bf16_send_dt;
        req = ucp_tag_send_nbx(im.eps[op.peer], pend[i].bf16, op.bytes, (op.tag << 16) | static_cast<uint64_t>(rank_),
                               &p);
      } else if (pass == 0 && (op.kind == P2POp::kRecvAdd || op.kind == P2POp::kRecvAddBf16) &&
                 pend[i].adder != nullptr) {
        p.op_attr_mask = UCP_OP_ATTR_FIELD_DATATYPE;
        p.datatype = im.add_dt;
        req = ucp_tag_recv_nbx(im.worker, pend[i].adder, op.bytes, recv_tag, ~uint64_t{0}, &p);
      } else if (pass == 0 && (op.kind == P2POp::kRecvAdd || op.kind == P2POp::kRecvAddBf16)) {
        req = ucp_tag_recv_nbx(im.worker, im.add_staging.data() + pend[i].staged_at, op.bytes, recv_tag, ~uint64_t{0},
                               &p);
      } else if (pass == 1 && op.kind == P2POp::kSend) {
        req = ucp_tag_send_nbx(im.eps[op.peer], op.buf, op.bytes, (op.tag << 16) | static_cast<uint64_t>(rank_), &p);
      } else {
        continue;
      }
      if (UCS_PTR_IS_ERR(req)) {
        result = absl::UnavailableError(absl::StrCat(what, ": ", describe(op), " rank ", op.peer, ": ",
                                                     ucs_status_string(UCS_PTR_STATUS(req))));
        req = nullptr;
      }
    }
  }
  size_t remaining = ops.size();
  while (result.ok() && remaining > 0) {
    bool any = false;
    for (size_t i = 0; i < ops.size() && result.ok(); ++i) {
      Pending& pe = pend[i];
      if (pe.finished) continue;
      const P2POp& op = ops[i];
      if (UCS_PTR_IS_PTR(pe.req)) {
        const ucs_status_t st = ucp_request_check_status(pe.req);
        if (st == UCS_INPROGRESS) continue;
        size_t length = op.bytes;
        if (!op.is_send() && st == UCS_OK) {
          ucp_tag_recv_info_t info{};
          if (ucp_tag_recv_request_test(pe.req, &info) == UCS_OK) length = info.length;
        }
        ucp_request_free(pe.req);
        pe.req = nullptr;
        if (st != UCS_OK) {
          ReportWaitingFor(op.peer);
          result = absl::UnavailableError(absl::StrCat(what, ": ", describe(op), " rank ", op.peer, ": ",
                                                       ucs_status_string(st)));
          break;
        }
        if (length != op.bytes) {
          result = absl::DataLossError(absl::StrCat(what, ": rank ", op.peer, " sent ", length, " bytes, expected ",
                                                    op.bytes));
          break;
        }
      }
      // Completed (or completed immediately at posting).
      if (pe.adder != nullptr && !pe.adder->complete()) {
        result = absl::DataLossError(absl::StrCat(what, ": rank ", op.peer, "'s message of ", op.bytes,
                                                  " bytes arrived incomplete (", pe.adder->received(), " bytes added",
                                                  pe.adder->overflow() ? ", a fragment beyond its end" : "", ")"));
        break;
      }
      if (pe.bf16 != nullptr && !pe.bf16->complete()) {
        result = absl::DataLossError(absl::StrCat(what, ": bf16 message of ", op.bytes, " bytes ",
                                                  op.is_send() ? "to" : "from", " rank ", op.peer, " ",
                                                  op.is_send() ? "packed" : "arrived", " incomplete (", pe.bf16->done,
                                                  " bytes", pe.bf16->overflow ? ", a fragment beyond its end" : "",
                                                  ")"));
        break;
      }
      if (pe.staged_at != SIZE_MAX) {
        AddFloats(static_cast<float*>(op.buf), im.add_staging.data() + pe.staged_at, op.bytes / sizeof(float));
      }
      pe.finished = true;
      --remaining;
      any = true;
      ReportWaitingFor(op.peer);
    }
    if (!result.ok() || remaining == 0) break;
    for (size_t i = 0; i < ops.size(); ++i) {
      if (!pend[i].finished) {
        ReportWaitingFor(ops[i].peer);
        break;
      }
    }
    // Failure checks, then progress.
    for (size_t i = 0; i < ops.size() && result.ok(); ++i) {
      if (!pend[i].finished && im.peer_status[ops[i].peer] != UCS_OK) {
        ReportWaitingFor(ops[i].peer);
        result = absl::UnavailableError(absl::StrCat(what, ": rank ", ops[i].peer, " failed (",
                                                     ucs_status_string(im.peer_status[ops[i].peer]), ")"));
      }
    }
    if (!result.ok()) break;
    if (aborted_.load()) {
      result = absl::AbortedError(absl::StrCat(what, ": communicator aborted"));
      break;
    }
    if (absl::Now() > deadline) {
      for (size_t i = 0; i < ops.size(); ++i) {
        if (pend[i].finished) continue;
        ReportWaitingFor(ops[i].peer);
        result = absl::DeadlineExceededError(absl::StrCat(what, ": timed out waiting for rank ", ops[i].peer,
                                                          ops[i].is_send() ? " to receive" : " to send"));
        break;
      }
      break;
    }
    if (!any) im.ProgressOrSleep();
  }
  if (!result.ok()) {
    // Cancel what is still pending (receives can be cancelled; sends are completed by the forced
    // endpoint close when the transport is destroyed).
    for (size_t i = 0; i < ops.size(); ++i) {
      ucs_status_ptr_t req = pend[i].req;
      if (!UCS_PTR_IS_PTR(req)) continue;
      if (ucp_request_check_status(req) == UCS_INPROGRESS && !ops[i].is_send()) {
        ucp_request_cancel(im.worker, req);
        for (int n = 0; n < 1000 && ucp_request_check_status(req) == UCS_INPROGRESS; ++n) ucp_worker_progress(im.worker);
      }
      ucp_request_free(req);
    }
    // A receive or send that UCX still references touches our buffers no more, and its state
    // stays alive.
    im.add_states.Retire([](StreamAdder& a) { a.Detach(); });
    im.bf16_states.Retire([](Bf16Message& m) { m.buf = nullptr; });
    im.broken = true;
  }
  return result;
}

}  // namespace lmsgd::comm
