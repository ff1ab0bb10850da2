// Small real data files for worker tests: IDX datasets and JPEG image folders written to a
// temporary directory.
#pragma once

#include <stdlib.h>
#include <turbojpeg.h>

#include <string>
#include <vector>

#include "common/file_util.h"

namespace lmsgd::testing {

inline std::string MakeTempDir(const std::string& tag) {
  std::string t = "/tmp/lmsgd_" + tag + "_XXXXXX";
  return mkdtemp(t.data());
}

inline std::string IdxBytes(const std::vector<uint32_t>& dims, const std::vector<uint8_t>& data) {
  std::string b = {0, 0, 0x08, static_cast<char>(dims.size())};
  for (uint32_t d : dims) {
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<char>((d >> s) & 0xff));
  }
  b.append(data.begin(), data.end());
  return b;
}

// An IDX dataset whose class c images have brightness 30 + 60c (plus noise) and a bright
// horizontal bar: learnable by a small ResNet in a few steps whatever the crop or flip. Writes train-* (n_train) and t10k-* (n_test).
inline void WriteBarsIdx(const std::string& dir, int n_train, int n_test, int size, int classes) {
  auto write = [&](const std::string& prefix, int n, uint32_t seed) {
    std::vector<uint8_t> images(static_cast<size_t>(n) * size * size), labels(n);
    uint32_t s = seed;
    for (int i = 0; i < n; ++i) {
      const int c = (i * 7 + static_cast<int>(seed)) % classes;
      labels[i] = static_cast<uint8_t>(c);
      for (int y = 0; y < size; ++y) {
        for (int x = 0; x < size; ++x) {
          s = s * 1664525u + 1013904223u;
          const int noise = static_cast<int>(s >> 27);  // 0..31
          images[(static_cast<size_t>(i) * size + y) * size + x] =
              static_cast<uint8_t>((y == size / 2 ? 200 : 30 + 50 * c) + noise);
        }
      }
    }
    (void)WriteFileAtomically(dir + "/" + prefix + "-images-idx3-ubyte",
                              IdxBytes({static_cast<uint32_t>(n), static_cast<uint32_t>(size), static_cast<uint32_t>(size)}, images));
    (void)WriteFileAtomically(dir + "/" + prefix + "-labels-idx1-ubyte", IdxBytes({static_cast<uint32_t>(n)}, labels));
  };
  write("train", n_train, 1);
  write("t10k", n_test, 2);
}

// A JPEG of a solid colour (or a gradient when `gradient`), width x height.
inline std::string MakeJpeg(int width, int height, uint8_t r, uint8_t g, uint8_t b, bool gradient = false) {
  std::vector<uint8_t> rgb(static_cast<size_t>(width) * height * 3);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      uint8_t* p = &rgb[(static_cast<size_t>(y) * width + x) * 3];
      p[0] = gradient ? static_cast<uint8_t>(x * 255 / std::max(1, width - 1)) : r;
      p[1] = gradient ? static_cast<uint8_t>(y * 255 / std::max(1, height - 1)) : g;
      p[2] = b;
    }
  }
  tjhandle tj = tjInitCompress();
  unsigned char* out = nullptr;
  unsigned long size = 0;
  tjCompress2(tj, rgb.data(), width, 0, height, TJPF_RGB, &out, &size, TJSAMP_444, 100, TJFLAG_ACCURATEDCT);
  std::string bytes(reinterpret_cast<char*>(out), size);
  tjFree(out);
  tjDestroy(tj);
  return bytes;
}

}  // namespace lmsgd::testing
