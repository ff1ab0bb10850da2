// deploy/ files stay consistent with the code: every metric the Grafana dashboard queries is one
// the coordinator or the worker declares, and the dashboard is valid JSON with panels.
#include <gtest/gtest.h>

#include <regex>
#include <set>

#include "common/file_util.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"

namespace lmsgd {
namespace {

std::string Source(const std::string& rel) {
  auto s = ReadFileToString(std::string(LMSGD_SOURCE_DIR) + "/" + rel);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.value_or("");
}

TEST(DeployTest, GrafanaDashboardQueriesOnlyDeclaredMetrics) {
  const std::string dash = Source("deploy/grafana/lmsgd-dashboard.json");
  google::protobuf::Struct parsed;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(dash, &parsed).ok());
  ASSERT_TRUE(parsed.fields().count("panels"));
  EXPECT_GE(parsed.fields().at("panels").list_value().values_size(), 6);
  const std::string declared = Source("coordinator/metrics.h") + Source("worker/session/metrics.h");
  std::set<std::string> names;
  const std::regex metric("lmsgd_(coordinator|worker)_[a-z0-9_]+");
  for (auto it = std::sregex_iterator(dash.begin(), dash.end(), metric); it != std::sregex_iterator(); ++it) {
    names.insert(it->str());
  }
  EXPECT_GE(names.size(), 8u);
  for (const auto& n : names) EXPECT_NE(declared.find(n), std::string::npos) << n << " is not declared";
}

TEST(DeployTest, PrometheusConfigScrapesCoordinatorAndWorkers) {
  const std::string yml = Source("deploy/prometheus/prometheus.yml");
  EXPECT_NE(yml.find("job_name: lmsgd-coordinator"), std::string::npos);
  EXPECT_NE(yml.find("job_name: lmsgd-worker"), std::string::npos);
}

}  // namespace
}  // namespace lmsgd
