// JPEG decoding that does only the work a crop needs (libjpeg-turbo's libjpeg API).
//
// A region of the full-resolution image is decoded at the smallest DCT scale (1/8, 1/4, 1/2
// or 1) that keeps the region at least `min_width` x `min_height` pixels: the IDCT then
// produces up to 64x fewer pixels. The other N/8 scales libjpeg-turbo offers are skipped:
// their IDCTs (and the 12x12 / 14x14 ones they imply for 4:2:0 chroma) have no SIMD code and
// measured slower than decoding twice the pixels at the next dyadic scale. Only the region's rows are decoded (rows above are entropy
// decoded and skipped, rows below are never read) and only its columns go through the IDCT
// and colour conversion (jpeg_crop_scanline, which widens them to the iMCU grid).
//
// Scaled pixel i covers full-resolution pixels [i * 8/num, (i+1) * 8/num), so a region
// (x, y, w, h) maps to (x, y, w, h) * num/8 in the decoded buffer; DecodedRegion says where.
//
// Errors are values (libjpeg's error_exit longjmps back to the decoding function, never across
// C++ frames). A warning (corrupt data, premature end) is an error too, since libjpeg would
// otherwise fill the rest with grey; and a file whose last 4 KiB hold no EOI marker is called
// truncated even when the rows a crop needs were intact, so a damaged file fails in every
// epoch, not only when its crop reaches the damage.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lmsgd::data {

struct JpegHeader {
  int width = 0;
  int height = 0;
  int components = 0;
};


struct DecodedRegion {
  std::vector<uint8_t> rgb;  // interleaved RGB, height rows of width * 3 bytes
  int width = 0, height = 0;
  int scale_num = 8;         // decoded at scale_num / 8
  // The requested region in the buffer's pixel coordinates (fractional after scaling).
  double box_x = 0, box_y = 0, box_w = 0, box_h = 0;
};

struct RegionRequest {
  // Region in full-resolution pixels; it is clipped to the image.
  int x = 0, y = 0, w = 0, h = 0;
  // The scaled region keeps at least this size (the resize target), when the image allows.
  int min_width = 1, min_height = 1;
  // Extra full-resolution pixels decoded around the region (a resize filter's support).
  int margin = 0;
  // libjpeg's fast integer IDCT (JDCT_IFAST) instead of the accurate one (JDCT_ISLOW).
  bool fast_idct = false;
};

absl::Status DecodeJpegRegion(std::string_view bytes, const std::string& name, const RegionRequest& request,
                              DecodedRegion* out);
// The same with the region chosen from the header the decoder has just read (one parse per
// image): `choose` gets the full-resolution size.
using RegionChooser = std::function<RegionRequest(const JpegHeader& header)>;
absl::Status DecodeJpegRegion(std::string_view bytes, const std::string& name, const RegionChooser& choose,
                              DecodedRegion* out);

// Full decode at scale 1, accurate IDCT (a reference for tests and tools).
absl::Status DecodeJpegFull(std::string_view bytes, const std::string& name, DecodedRegion* out);

// Encodes interleaved RGB as a baseline JPEG (4:2:0 chroma subsampling) at `quality`.
absl::StatusOr<std::string> EncodeJpeg(const uint8_t* rgb, int width, int height, int quality);

}  // namespace lmsgd::data
