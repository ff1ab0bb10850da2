// gRPC glue: absl::Status <-> grpc::Status, TLS credentials from files, bearer tokens.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/grpcpp.h"

namespace lmsgd {

grpc::Status ToGrpcStatus(const absl::Status& status);
// `context` names the call and peer, e.g. "SubmitJob to 127.0.0.1:7070".
absl::Status FromGrpcStatus(const grpc::Status& status, absl::string_view context);

struct TlsFiles {
  std::string cert;       // PEM certificate chain (server: its cert; client: for mutual TLS)
  std::string key;        // PEM private key
  std::string client_ca;  // server: CA that client certificates must chain to (mutual TLS)
  std::string ca;         // client: CA to verify the server with
  bool empty() const { return cert.empty() && key.empty() && client_ca.empty() && ca.empty(); }
};

// Insecure credentials when `files` is empty, TLS (and mutual TLS with client_ca) otherwise.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& files);
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsFiles& files);

// Reads a token file: the first line, whitespace trimmed. Errors name the file; an empty
// token is an error.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// Constant-time comparison, for secrets.
bool SecureEquals(absl::string_view a, absl::string_view b);

}  // namespace lmsgd
