// The JPEG pipeline against definitions: crop-aware decoding against a full decode followed
// by a float64 resize, the antialiasing filter on patterns that alias, the fused resize
// against its float64 definition, float against uint8 output, and damaged files.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "worker/data/dataset.h"
#include "worker/data/image_transform.h"
#include "worker/data/jpeg.h"
#include "worker/data/photo_generator.h"
#include "worker/data/resize.h"

namespace lmsgd::data {
namespace {

std::string Photo(int index, PhotoSize* size_out = nullptr) {
  const PhotoSize size = PhotoSizeFor(3, 1, index);
  const std::vector<uint8_t> rgb = MakePhoto(3, 1, index, size);
  if (size_out != nullptr) *size_out = size;
  auto jpeg = EncodeJpeg(rgb.data(), size.width, size.height, 90);
  EXPECT_TRUE(jpeg.ok()) << jpeg.status();
  return jpeg.ok() ? *jpeg : "";
}

struct ErrorStats {
  double mean = 0, p99 = 0, max = 0;
};

ErrorStats Compare(const std::vector<uint8_t>& got, const std::vector<double>& want) {
  std::vector<double> d(got.size());
  double sum = 0;
  for (size_t i = 0; i < got.size(); ++i) sum += (d[i] = std::fabs(got[i] - want[i]));
  std::sort(d.begin(), d.end());
  return {sum / d.size(), d[d.size() * 99 / 100], d.back()};
}

// The decoded and resized crop (uint8, at the scale the pipeline picks) against the
// definition: the whole image decoded at full resolution with the accurate IDCT, then the
// crop resized by the float64 filter.
ErrorStats CropError(const std::string& jpeg, const RegionRequest& req, int out, bool fast_idct, int* scale_num) {
  DecodedRegion full;
  EXPECT_TRUE(DecodeJpegFull(jpeg, "ref.jpg", &full).ok());
  std::vector<double> want(static_cast<size_t>(out) * out * 3);
  ResizeCropReference(full.rgb.data(), full.height, full.width, full.width * 3,
                      CropBox{double(req.x), double(req.y), double(req.w), double(req.h), true}, out, out, false,
                      want.data());
  RegionRequest r = req;
  r.min_width = r.min_height = out;
  r.fast_idct = fast_idct;
  DecodedRegion region;
  EXPECT_TRUE(DecodeJpegRegion(jpeg, "crop.jpg", r, &region).ok());
  *scale_num = region.scale_num;
  std::vector<uint8_t> got(want.size());
  ResizeCrop(region.rgb.data(), region.height, region.width, region.width * 3,
             CropBox{region.box_x, region.box_y, region.box_w, region.box_h, true}, out, out, false,
             PixelFormat::kUint8Hwc, got.data());
  return Compare(got, want);
}

TEST(JpegPipelineTest, DecodedCropsEqualAFullDecodeThenFloat64ResizeAtEveryScale) {
  // Tolerances, in 8-bit levels: DCT scaling is itself a low-pass filter (an 8x8 block's
  // lowest frequencies), not the triangle filter, so crops decoded at 1/2 to 1/8 differ from
  // the reference most on edges. Measured worst over these cases: mean 1.3, p99 5.2 levels
  // (at 1/2); at full scale only the final rounding (0.5).
  constexpr double kMean = 1.6, kP99 = 6;
  std::set<int> scales;
  std::map<int, ErrorStats> worst;
  for (int index = 0; index < 4; ++index) {
    PhotoSize size;
    const std::string jpeg = Photo(index, &size);
    const int W = size.width, H = size.height;
    // The whole image and crops that land on each DCT scale for a 64 or 224 output.
    const std::vector<RegionRequest> crops = {
        {0, 0, W, H}, {W / 4, H / 5, W / 2, H / 2}, {W / 3, H / 3, W / 5, H / 4}, {7, 11, W - 20, H - 30}};
    for (const RegionRequest& c : crops) {
      for (int out : {224, 64, 32}) {
        int scale = 0;
        const ErrorStats e = CropError(jpeg, c, out, false, &scale);
        scales.insert(scale);
        ErrorStats& w = worst[scale];
        w.mean = std::max(w.mean, e.mean);
        w.p99 = std::max(w.p99, e.p99);
        w.max = std::max(w.max, e.max);
        EXPECT_LT(e.mean, kMean) << "image " << index << " crop " << c.x << "," << c.y << " " << c.w << "x" << c.h
                                 << " -> " << out << " at " << scale << "/8";
        EXPECT_LE(e.p99, kP99) << "image " << index << " at " << scale << "/8";
        if (scale == 8) {  // no DCT scaling: only the decoder's rounding differs
          EXPECT_LT(e.mean, 0.3);
          EXPECT_LE(e.max, 0.51);
        }
      }
    }
  }
  EXPECT_EQ(scales, (std::set<int>{1, 2, 4, 8})) << "the cases must exercise every DCT scale";
  for (const auto& [scale, w] : worst) {
    std::cout << "decoded at " << scale << "/8: worst mean " << w.mean << ", p99 " << w.p99 << ", max " << w.max
              << " levels\n";
  }
}

TEST(JpegPipelineTest, TheFastIntegerIdctMeasuresLessAccurateSoThePipelineKeepsTheAccurateOne) {
  double slow = 0, fast = 0;
  int cases = 0;
  for (int index = 0; index < 4; ++index) {
    PhotoSize size;
    const std::string jpeg = Photo(index, &size);
    const RegionRequest c{size.width / 6, size.height / 6, size.width * 2 / 3, size.height * 2 / 3};
    for (int out : {224, 128}) {
      int s1 = 0, s2 = 0;
      slow += CropError(jpeg, c, out, false, &s1).mean;
      fast += CropError(jpeg, c, out, true, &s2).mean;
      ++cases;
    }
  }
  std::cout << "mean error against the reference: accurate IDCT " << slow / cases << ", fast IDCT " << fast / cases
            << " levels\n";
  // The pipeline uses the accurate IDCT; this pins why: the fast one's error is larger.
  EXPECT_GT(fast / cases, slow / cases) << "fast " << fast / cases << " accurate " << slow / cases;
}

TEST(ResizeTest, AFineCheckerboardShrinksToFlatGreyNotAnAliasPattern) {
  for (int in : {448, 627, 1000}) {
    std::vector<uint8_t> board(static_cast<size_t>(in) * in * 3);
    for (int y = 0; y < in; ++y) {
      for (int x = 0; x < in; ++x) {
        for (int c = 0; c < 3; ++c) board[(static_cast<size_t>(y) * in + x) * 3 + c] = ((x + y) & 1) ? 255 : 0;
      }
    }
    std::vector<uint8_t> out(224 * 224 * 3);
    ResizeCrop(board.data(), in, in, in * 3, CropBox{0, 0, double(in), double(in), true}, 224, 224, false,
               PixelFormat::kUint8Hwc, out.data());
    double sum = 0, sq = 0;
    int lo = 255, hi = 0;
    for (uint8_t v : out) {
      sum += v;
      sq += double(v) * v;
      lo = std::min<int>(lo, v);
      hi = std::max<int>(hi, v);
    }
    const double mean = sum / out.size(), sd = std::sqrt(sq / out.size() - mean * mean);
    EXPECT_NEAR(mean, 127.5, 1.0) << in;
    // Bilinear sampling of two pixels would give a pattern spanning 0..255 here.
    EXPECT_LT(sd, 2.0) << in << " -> 224";
    EXPECT_GE(lo, 120) << in;
    EXPECT_LE(hi, 135) << in;
  }
}

TEST(ResizeTest, FusedResizeEqualsItsFloat64DefinitionAndFloatAndUint8Agree) {
  PhotoSize size = PhotoSizeFor(5, 2, 0);
  const std::vector<uint8_t> rgb = MakePhoto(5, 2, 0, size);
  const int W = size.width, H = size.height;
  const std::vector<CropBox> boxes = {{0, 0, double(W), double(H), true},
                                      {10.25, 20.5, 150.75, 99.5, true},
                                      {W * 0.3, H * 0.2, W * 0.5, H * 0.7, false},
                                      {3, 4, 40, 30, true}};  // enlarged 5x
  for (const CropBox& box : boxes) {
    for (bool flip : {false, true}) {
      for (int out : {224, 37}) {
        std::vector<double> want(static_cast<size_t>(out) * out * 3);
        ResizeCropReference(rgb.data(), H, W, W * 3, box, out, out, flip, want.data());
        std::vector<float> f(want.size());
        std::vector<uint8_t> u(want.size());
        ResizeCrop(rgb.data(), H, W, W * 3, box, out, out, flip, PixelFormat::kFloatChw, f.data());
        ResizeCrop(rgb.data(), H, W, W * 3, box, out, out, flip, PixelFormat::kUint8Hwc, u.data());
        double worst_f = 0, worst_u = 0, worst_fu = 0;
        for (int y = 0; y < out; ++y) {
          for (int x = 0; x < out; ++x) {
            for (int c = 0; c < 3; ++c) {
              const size_t hwc = (static_cast<size_t>(y) * out + x) * 3 + c;
              const float fv = f[static_cast<size_t>(c) * out * out + static_cast<size_t>(y) * out + x];
              const double level = (fv * kImageNetStd[c] + kImageNetMean[c]) * 255.0;  // back to 0..255
              worst_f = std::max(worst_f, std::fabs(level - want[hwc]));
              worst_u = std::max(worst_u, std::fabs(u[hwc] - want[hwc]));
              worst_fu = std::max(worst_fu, std::fabs(level - u[hwc]));
            }
          }
        }
        EXPECT_LT(worst_f, 0.01) << "box " << box.x << "," << box.y << " flip " << flip << " out " << out;
        EXPECT_LE(worst_u, 0.51) << "uint8 is the reference rounded";
        EXPECT_LE(worst_fu, 0.51) << "float and uint8 outputs agree to the rounding";
      }
    }
  }
}

TEST(ImageTransformTest, TrainCropsFollowRandomResizedCropAndDependOnTheSeedOnly) {
  std::set<std::pair<int, int>> origins;
  int flips = 0;
  for (uint64_t seed = 0; seed < 2000; ++seed) {
    const CropChoice c = ChooseTrainCrop(500, 375, seed);
    const CropChoice again = ChooseTrainCrop(500, 375, seed);
    ASSERT_EQ(c.x, again.x);
    ASSERT_EQ(c.w, again.w);
    ASSERT_EQ(c.flip, again.flip);
    ASSERT_GE(c.x, 0);
    ASSERT_GE(c.y, 0);
    ASSERT_LE(c.x + c.w, 500);
    ASSERT_LE(c.y + c.h, 375);
    const double area = double(c.w) * c.h / (500.0 * 375), ratio = double(c.w) / c.h;
    EXPECT_GE(area, 0.08 - 0.01);
    EXPECT_LE(area, 1.0);
    EXPECT_GE(ratio, 0.75 * 0.97);
    EXPECT_LE(ratio, 4.0 / 3 * 1.03);
    origins.insert({c.x, c.y});
    flips += c.flip;
  }
  EXPECT_GT(origins.size(), 1500u);
  EXPECT_NEAR(flips, 1000, 120);
}

TEST(ImageTransformTest, UintAndFloatTransformsAgreeAndDamagedFilesAreNamed) {
  const std::string jpeg = Photo(2);
  for (bool train : {true, false}) {
    std::vector<float> f(3 * 224 * 224);
    std::vector<uint8_t> u(3 * 224 * 224);
    ASSERT_TRUE(TransformJpeg(jpeg, "a.jpg", train, 99, 224, PixelFormat::kFloatChw, f.data()).ok());
    ASSERT_TRUE(TransformJpeg(jpeg, "a.jpg", train, 99, 224, PixelFormat::kUint8Hwc, u.data()).ok());
    double worst = 0;
    for (int c = 0; c < 3; ++c) {
      for (int i = 0; i < 224 * 224; ++i) {
        const double level = (f[c * 224 * 224 + i] * kImageNetStd[c] + kImageNetMean[c]) * 255.0;
        worst = std::max(worst, std::fabs(level - u[i * 3 + c]));
      }
    }
    EXPECT_LE(worst, 0.51) << (train ? "train" : "eval");
  }
  std::vector<float> out(3 * 224 * 224);
  const auto truncated = TransformJpeg(jpeg.substr(0, jpeg.size() / 3), "cut.jpg", true, 1, 224,
                                       PixelFormat::kFloatChw, out.data());
  ASSERT_FALSE(truncated.ok());
  EXPECT_NE(truncated.message().find("cut.jpg"), std::string::npos) << truncated;
  const auto garbage = TransformJpeg("not a jpeg at all", "junk.jpg", true, 1, 224, PixelFormat::kFloatChw, out.data());
  ASSERT_FALSE(garbage.ok());
  EXPECT_NE(garbage.message().find("junk.jpg"), std::string::npos) << garbage;
  // Damage inside the entropy-coded data (the file keeps its EOI): libjpeg's warning is an
  // error, not a grey fill.
  std::string damaged = jpeg;
  for (size_t i = damaged.size() / 2; i < damaged.size() / 2 + 64; ++i) damaged[i] = static_cast<char>(0xFF);
  const auto bad = TransformJpeg(damaged, "bits.jpg", false, 1, 224, PixelFormat::kFloatChw, out.data());
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("bits.jpg"), std::string::npos) << bad;
}

}  // namespace
}  // namespace lmsgd::data
