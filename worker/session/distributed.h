// A worker in a coordinated job (`lmsgd-worker --coordinator ADDR`).
//
// The protocol, from the worker's side (see coordinator.proto for the coordinator's):
//   1. Join (a given job, or the next one that needs workers) and wait for a generation:
//      rank, world size k, spec, schedule, the members (hosts) and the resume checkpoint.
//   2. Bootstrap the communicator for (job, generation) through the coordinator (UCX
//      addresses), build the trainer, and either load the resume checkpoint or receive rank 0's
//      initial weights (broadcast).
//   3. Train the rank's shard: per step the paper's update with gradient buckets allreduced
//      during backward; a background thread heartbeats progress every heartbeat_interval_s and
//      acts on the directive (ABORT_AND_REJOIN aborts the communicator; STOP ends the worker).
//   4. At each epoch end the sharded evaluation's counts are summed over ranks and rank 0
//      reports them; at each checkpoint interval (and the end) rank 0 writes a checkpoint and
//      reports it (all ranks agree on the step: epoch boundaries).
//   5. After the last epoch every rank heartbeats completed=true; rank 0's ends the job.
//   On a communication failure or an abort, the worker reports it (non-fatal), tears everything
//   of the generation down and goes back to 1 with last_generation set: the job re-forms and
//   resumes from its last checkpoint. Checkpoint paths must be readable by every worker (one
//   host, or a shared file system).
#pragma once

#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "worker/session/coordinator_client.h"
#include "worker/session/metrics.h"

namespace lmsgd::session {

struct WorkerOptions {
  CoordinatorClientOptions client;
  std::string job_id;          // empty: the next job that needs workers
  std::string host;            // empty: this machine's host name
  // Distinguishes workers of one host; < 0: the launcher's LOCAL_RANK / SLURM_LOCALID /
  // JOB_COMPLETION_INDEX, else the lowest free slot (local_slot.h).
  int local_device = -1;
  std::string slot_dir;        // empty: DefaultSlotDir()
  int cuda_device = -1;        // >= 0: train on GPU cuda:N (gradients over NCCL); -1: the CPU
  int threads = 0;             // compute threads (0 = cores)
  int data_threads = 0;        // 0: the job's dataset.decode_threads, else 2 (train::DataThreads)
  absl::Duration join_timeout = absl::Hours(24);
  absl::Duration test_data_delay = absl::ZeroDuration();  // tests only (train::LoopOptions)
  int max_generations = 100;   // re-joins before giving up
  std::ostream* log = nullptr;
  WorkerMetrics* metrics = nullptr;  // optional (served by main on --metrics_listen)
};

// Runs until the job succeeds (OK), the coordinator says STOP (OK), or a final error.
absl::Status RunWorker(const WorkerOptions& options);

}  // namespace lmsgd::session
