// JobSpec handling shared by the coordinator and lmsgdctl: defaults (the paper's recipe),
// validation that names every bad field, job-file parsing (text proto or JSON), and the
// schedule the coordinator publishes for a formed generation.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/lr_schedule.h"
#include "google/protobuf/message.h"
#include "lmsgd/v1/job.pb.h"

namespace lmsgd {

// Fills every unset field with the paper's default (see job.proto).
void ApplyDefaults(v1::JobSpec* spec);

// Every problem as "field: what is wrong"; empty when the spec is valid.
// Expects ApplyDefaults to have run.
std::vector<std::string> JobSpecErrors(const v1::JobSpec& spec);
// INVALID_ARGUMENT listing every error, or OK.
absl::Status ValidateJobSpec(const v1::JobSpec& spec);

// kn = world_size * virtual_workers_per_worker * per_worker_batch.
uint64_t GlobalBatch(const v1::JobSpec& spec, uint32_t world_size);

// Parses a job file's contents: JSON when `path` ends in .json, protobuf text format for
// .textproto/.txtpb/.pbtxt; for other names JSON if the text starts with '{', else text.
// Errors name the path (and line:column for text format).
absl::StatusOr<v1::JobSpec> ParseJobSpec(const std::string& path, const std::string& contents);
// protobuf's JSON mapping with proto field names, one line unless `pretty`.
std::string ProtoToJson(const google::protobuf::Message& message, bool pretty);
// The same for any message (experiment files): errors name the path and the message type.
absl::Status ParseProtoText(const std::string& path, const std::string& contents, google::protobuf::Message* message);
absl::StatusOr<v1::JobSpec> ReadJobFile(const std::string& path);

// The schedule for a generation of `world_size` workers.
v1::Schedule MakeSchedule(const v1::JobSpec& spec, uint32_t world_size);
LrScheduleParams ScheduleParams(const v1::Schedule& schedule);

}  // namespace lmsgd
