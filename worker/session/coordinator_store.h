// The communicator's rendezvous Store backed by the coordinator's PublishBootstrap /
// GetBootstrap RPCs, scoped to one (job, generation): nothing of another generation is ever
// read. Keys have the form "<anything>/<name>/<rank>" (UcxTransport uses "<prefix>/ucx/<r>");
// Set publishes this rank's value under <name>; Get fetches every rank's <name> in one RPC
// (the coordinator waits server-side until all have published, bounded by the deadline) and
// serves later Gets of the same name from that answer.
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "worker/comm/store.h"
#include "worker/session/coordinator_client.h"

namespace lmsgd::session {

class CoordinatorStore final : public comm::Store {
 public:
  CoordinatorStore(CoordinatorClient* client, std::string job_id, uint64_t generation, int rank)
      : client_(client), job_id_(std::move(job_id)), generation_(generation), rank_(rank) {}
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, absl::Time deadline) override;

 private:
  CoordinatorClient* client_;
  std::string job_id_;
  uint64_t generation_;
  int rank_;
  std::mutex mu_;
  std::map<std::string, std::vector<std::string>> fetched_;  // name -> values by rank
};

}  // namespace lmsgd::session
