// lmsgdctl: the command-line client of the coordinator.
//
//   lmsgdctl [--coordinator ADDR] [--output table|json] COMMAND ARGS
//     submit JOBFILE     validate locally, submit, print the job id
//     status JOB         one job's status
//     list [--all]       live jobs (--all: ended ones too)
//     watch JOB          live progress until the job ends
//     cancel JOB [--reason TEXT]
//     history JOB        per-epoch history: table, JSON lines (--output json) or CSV
// Options: --coordinator (env LMSGD_COORDINATOR, default 127.0.0.1:7070), --output (csv:
//   history only; elsewhere it reads as table),
//   --token_file (env LMSGD_TOKEN_FILE) or env LMSGD_TOKEN, --tls_ca, --tls_cert, --tls_key,
//   --timeout SECONDS (per RPC, default 10).
// Exit codes: 0 ok; 1 error; 2 usage; 3 `watch` saw the job fail or get cancelled.
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "lmsgd/v1/job.pb.h"

namespace lmsgd::ctl {

int RunCtl(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

// Human-readable renderings (also used by tests).
std::string FormatStatusTable(const v1::JobStatus& job);
std::string FormatListTable(const std::vector<v1::JobStatus>& jobs);
std::string FormatProgressLine(const v1::JobStatus& job, int bar_width);

}  // namespace lmsgd::ctl
