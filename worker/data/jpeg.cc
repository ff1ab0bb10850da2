#include "worker/data/jpeg.h"

// clang-format off
#include <cstdio>   // jpeglib.h needs FILE and size_t first
#include <jpeglib.h>
// clang-format on
#include <turbojpeg.h>

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace lmsgd::data {
namespace {

constexpr int64_t kMaxPixels = int64_t{1} << 28;
constexpr size_t kEoiSearch = 4096;

struct ErrorManager {
  jpeg_error_mgr pub;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  int warnings;
};

void ErrorExit(j_common_ptr cinfo) {
  auto* e = reinterpret_cast<ErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, e->message);
  std::longjmp(e->jump, 1);
}

// Warnings (level -1) are kept, the first one's text for the error; trace messages are dropped.
void EmitMessage(j_common_ptr cinfo, int level) {
  if (level >= 0) return;
  auto* e = reinterpret_cast<ErrorManager*>(cinfo->err);
  if (e->warnings++ == 0) (*cinfo->err->format_message)(cinfo, e->message);
}

void OutputMessage(j_common_ptr) {}

bool HasEoi(std::string_view bytes) {
  const size_t from = bytes.size() > kEoiSearch ? bytes.size() - kEoiSearch : 0;
  for (size_t i = bytes.size(); i-- > from + 1;) {
    if (static_cast<uint8_t>(bytes[i - 1]) == 0xFF && static_cast<uint8_t>(bytes[i]) == 0xD9) return true;
  }
  return false;
}

// Adobe CMYK/YCCK JPEGs store inverted CMYK (what Photoshop writes and PIL assumes):
// R = C * K / 255 on the stored values.
void CmykToRgbInPlace(std::vector<uint8_t>* px, size_t pixels) {
  uint8_t* p = px->data();
  for (size_t i = 0; i < pixels; ++i) {
    const unsigned k = p[4 * i + 3];
    const uint8_t r = static_cast<uint8_t>(p[4 * i] * k / 255), g = static_cast<uint8_t>(p[4 * i + 1] * k / 255),
                  b = static_cast<uint8_t>(p[4 * i + 2] * k / 255);
    p[3 * i] = r;
    p[3 * i + 1] = g;
    p[3 * i + 2] = b;
  }
  px->resize(pixels * 3);
}

int FloorScaled(int v, int num) { return static_cast<int>((static_cast<int64_t>(v) * num) / 8); }
int CeilScaled(int v, int num) { return static_cast<int>((static_cast<int64_t>(v) * num + 7) / 8); }

// The decoder proper. Objects with destructors live in the caller (`out`) or are made only
// after the longjmp target returns, so the jump skips no destructor.
absl::Status Decode(std::string_view bytes, const std::string& name, const RegionChooser* choose,
                    DecodedRegion* out) {
  if (bytes.size() < 4 || static_cast<uint8_t>(bytes[0]) != 0xFF || static_cast<uint8_t>(bytes[1]) != 0xD8) {
    return absl::DataLossError(absl::StrCat("corrupt JPEG '", name, "': no SOI marker (not a JPEG file)"));
  }
  if (!HasEoi(bytes)) {
    return absl::DataLossError(
        absl::StrCat("corrupt JPEG '", name, "': truncated (no EOI marker in its last ", kEoiSearch, " bytes)"));
  }
  jpeg_decompress_struct cinfo;
  ErrorManager err;
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = ErrorExit;
  err.pub.emit_message = EmitMessage;
  err.pub.output_message = OutputMessage;
  err.warnings = 0;
  err.message[0] = '\0';
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return absl::DataLossError(absl::StrCat("corrupt JPEG '", name, "': ", err.message));
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&cinfo, TRUE);
  const int W = static_cast<int>(cinfo.image_width), H = static_cast<int>(cinfo.image_height);
  if (W <= 0 || H <= 0 || static_cast<int64_t>(W) * H > kMaxPixels) {
    jpeg_destroy_decompress(&cinfo);
    return absl::DataLossError(absl::StrCat("JPEG '", name, "' has unusable size ", W, "x", H));
  }
  const bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  // The chooser runs no libjpeg call, so no longjmp can cross it; its result is trivially
  // destructible.
  RegionRequest chosen;
  const RegionRequest* request = nullptr;
  if (choose != nullptr) {
    chosen = (*choose)(JpegHeader{W, H, cinfo.num_components});
    request = &chosen;
  }
  cinfo.dct_method = request != nullptr && request->fast_idct ? JDCT_IFAST : JDCT_ISLOW;
  // The region (clipped), and the scale that keeps it at least min_width x min_height.
  int rx = 0, ry = 0, rw = W, rh = H, margin = 0, num = 8;
  if (request != nullptr) {
    rx = std::clamp(request->x, 0, W - 1);
    ry = std::clamp(request->y, 0, H - 1);
    rw = std::clamp(request->w, 1, W - rx);
    rh = std::clamp(request->h, 1, H - ry);
    margin = std::max(request->margin, 0);
    for (num = 1; num < 8; ++num) {
      if (num & (num - 1)) continue;  // 1/8, 1/4, 1/2: the scales with SIMD IDCTs
      if (static_cast<int64_t>(rw) * num >= int64_t{8} * request->min_width &&
          static_cast<int64_t>(rh) * num >= int64_t{8} * request->min_height) {
        break;
      }
    }
  }
  cinfo.scale_num = static_cast<unsigned>(num);
  cinfo.scale_denom = 8;
  jpeg_start_decompress(&cinfo);
  const int OW = static_cast<int>(cinfo.output_width), OH = static_cast<int>(cinfo.output_height);
  // Two decoded pixels beyond the region on every side: libjpeg treats the edges of the rows and
  // columns it produces as image edges (chroma upsampling replicates them), which must not reach
  // pixels of the region.
  constexpr int kEdge = 2;
  const int sx0 = std::max(0, FloorScaled(rx - margin, num) - kEdge);
  const int sx1 = std::min(OW, CeilScaled(rx + rw + margin, num) + kEdge);
  const int sy0 = std::max(0, FloorScaled(ry - margin, num) - kEdge);
  const int sy1 = std::min(OH, CeilScaled(ry + rh + margin, num) + kEdge);
  JDIMENSION xoff = static_cast<JDIMENSION>(sx0), cw = static_cast<JDIMENSION>(std::max(1, sx1 - sx0));
  if (static_cast<int>(cw) < OW) jpeg_crop_scanline(&cinfo, &xoff, &cw);
  const int comps = cmyk ? 4 : 3;
  const size_t row_bytes = static_cast<size_t>(cw) * comps;
  const int rows = std::max(1, sy1 - sy0);
  out->rgb.resize(row_bytes * rows);
  if (sy0 > 0) jpeg_skip_scanlines(&cinfo, static_cast<JDIMENSION>(sy0));
  JSAMPROW row_ptrs[16];
  while (static_cast<int>(cinfo.output_scanline) < sy0 + rows) {
    const int at = static_cast<int>(cinfo.output_scanline) - sy0;
    const int n = std::min(16, rows - at);
    for (int i = 0; i < n; ++i) row_ptrs[i] = out->rgb.data() + static_cast<size_t>(at + i) * row_bytes;
    if (jpeg_read_scanlines(&cinfo, row_ptrs, static_cast<JDIMENSION>(n)) == 0) break;
  }
  const bool complete = static_cast<int>(cinfo.output_scanline) >= sy0 + rows;
  const int warnings = err.warnings;
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  if (warnings > 0) return absl::DataLossError(absl::StrCat("corrupt JPEG '", name, "': ", err.message));
  if (!complete) return absl::DataLossError(absl::StrCat("corrupt JPEG '", name, "': ended before its last row"));
  if (cmyk) CmykToRgbInPlace(&out->rgb, static_cast<size_t>(cw) * rows);
  out->width = static_cast<int>(cw);
  out->height = rows;
  out->scale_num = num;
  out->box_x = rx * num / 8.0 - static_cast<double>(xoff);
  out->box_y = ry * num / 8.0 - sy0;
  out->box_w = rw * num / 8.0;
  out->box_h = rh * num / 8.0;
  return absl::OkStatus();
}

}  // namespace

absl::Status DecodeJpegRegion(std::string_view bytes, const std::string& name, const RegionRequest& request,
                              DecodedRegion* out) {
  const RegionChooser fixed = [&](const JpegHeader&) { return request; };
  return Decode(bytes, name, &fixed, out);
}

absl::Status DecodeJpegRegion(std::string_view bytes, const std::string& name, const RegionChooser& choose,
                              DecodedRegion* out) {
  return Decode(bytes, name, &choose, out);
}

absl::Status DecodeJpegFull(std::string_view bytes, const std::string& name, DecodedRegion* out) {
  return Decode(bytes, name, nullptr, out);
}

absl::StatusOr<std::string> EncodeJpeg(const uint8_t* rgb, int width, int height, int quality) {
  tjhandle tj = tjInitCompress();
  if (tj == nullptr) return absl::InternalError("tjInitCompress failed");
  unsigned char* buf = nullptr;
  unsigned long size = 0;
  const int rc = tjCompress2(tj, rgb, width, 0, height, TJPF_RGB, &buf, &size, TJSAMP_420, quality, TJFLAG_ACCURATEDCT);
  std::string result;
  if (rc == 0) result.assign(reinterpret_cast<const char*>(buf), size);
  const std::string msg = rc != 0 ? tjGetErrorStr2(tj) : "";
  tjFree(buf);
  tjDestroy(tj);
  if (rc != 0) return absl::InternalError(absl::StrCat("JPEG encode of ", width, "x", height, ": ", msg));
  return result;
}

}  // namespace lmsgd::data
