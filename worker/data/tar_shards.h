// Sharded datasets in the WebDataset layout: tar files whose members are `{key}.jpg` (the
// JPEG) and `{key}.cls` (its class index as ASCII decimal), the key being everything before
// the first '.' of the member's file name. Other tools (webdataset, tar) read them as they are.
// A shard directory may hold `classes.txt`, one class name per line in index order, which
// `lmsgdctl dataset pack` writes so that the validation shards and checkpoints keep the
// ImageFolder's class names.
//
// Access pattern: opening indexes every shard once (headers only, data skipped; the .cls
// members are read then), and an example is one pread of its JPEG at the indexed offset. The
// paper's sharding therefore stays exact: one permutation of the whole set per epoch, split k
// ways, whatever shard an example lives in. The cost is random reads, as with an ImageFolder
// (one read per image instead of an open, read and close); on file systems where random reads
// inside large files are slow (object stores, some network file systems), stage the shards to
// local disk first.
//
// Examples go through image_transform.h exactly as an ImageFolder's do; examples are numbered
// in shard order (shards sorted by name), then in member order.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/data/dataset.h"

namespace lmsgd::data {

class TarShardDataset final : public Dataset {
 public:
  ~TarShardDataset() override;
  // `path`: a directory (its *.tar files, sorted) or a comma-separated list of tar files.
  // `classes`, when given, fixes the class list (validation uses the training set's);
  // otherwise it comes from classes.txt beside the shards, or is "0".."K-1".
  static absl::StatusOr<std::unique_ptr<TarShardDataset>> Open(const std::string& path, int size,
                                                               std::vector<std::string> classes = {});
  uint64_t size() const override { return examples_.size(); }
  int channels() const override { return 3; }
  int height() const override { return size_; }
  int width() const override { return size_; }
  int num_classes() const override { return static_cast<int>(classes_.size()); }
  const std::vector<std::string>& classes() const { return classes_; }
  const std::vector<std::string>& shards() const { return shards_; }
  absl::Status Get(uint64_t index, bool train, uint64_t aug_seed, float* out, int32_t* label) const override;
  bool SupportsUint8() const override { return true; }
  absl::Status GetPixels(uint64_t index, bool train, uint64_t aug_seed, PixelFormat format, void* out,
                         int32_t* label) const override;
  std::string Describe(uint64_t index) const override;
  // The raw JPEG bytes of example `index` and its key.
  absl::Status ReadExample(uint64_t index, std::string* bytes, std::string* key, int32_t* label) const;

 private:
  struct Example {
    uint32_t shard = 0;
    uint64_t offset = 0, bytes = 0;
    int32_t label = 0;
    std::string key;
  };
  TarShardDataset() = default;
  int size_ = 224;
  std::vector<std::string> shards_;
  std::vector<int> fds_;
  std::vector<std::string> classes_;
  std::vector<Example> examples_;
};

struct PackOptions {
  uint64_t shard_bytes = uint64_t{1} << 30;  // a new shard starts before one would exceed this
  // Members are written in this seeded order, so that sequential readers see mixed classes.
  uint64_t shuffle_seed = 0;
};

struct PackStats {
  uint64_t examples = 0, shards = 0, bytes = 0;
};

// Converts an ImageFolder into out_dir/shard-000000.tar, ... and out_dir/classes.txt. Keys are
// "<class>/<file stem>" (dots in the stem become '_'), so unpacking restores the folder.
absl::StatusOr<PackStats> PackImageFolder(const std::string& image_folder, const std::string& out_dir,
                                          const PackOptions& options);

// The inverse: out_dir/<class name>/<stem>.jpg for every example of the shards at `path`.
absl::StatusOr<uint64_t> UnpackShards(const std::string& path, const std::string& out_dir);

}  // namespace lmsgd::data
