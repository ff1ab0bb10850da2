#include "worker/checkpoint/safetensors.h"

#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"

namespace lmsgd::checkpoint {
namespace {

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// A minimal JSON reader for the safetensors header: objects, arrays, strings, integers.
struct JsonValue {
  enum Kind { kObject, kArray, kString, kNumber } kind = kNumber;
  // Object members as parallel vectors (keys[i] -> values[i]): a vector of pairs holding this
  // still-incomplete type is rejected by some standard libraries.
  std::vector<std::string> keys;
  std::vector<JsonValue> values;
  std::vector<JsonValue> array;
  std::string str;
  int64_t number = 0;
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}
  absl::StatusOr<JsonValue> Parse() {
    auto v = Value(0);
    if (!v.ok()) return v;
    Ws();
    if (pos_ != s_.size()) return Err("trailing characters");
    return v;
  }

 private:
  absl::Status Err(const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("header JSON: ", what, " at offset ", pos_));
  }
  void Ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\t' || s_[pos_] == '\r')) ++pos_;
  }
  absl::StatusOr<std::string> String() {
    if (pos_ >= s_.size() || s_[pos_] != '"') return Err("expected a string");
    ++pos_;
    std::string out;
    while (pos_ < s_.size() && s_[pos_] != '"') {
      char c = s_[pos_++];
      if (c == '\\') {
        if (pos_ >= s_.size()) return Err("bad escape");
        char e = s_[pos_++];
        if (e == 'u') {
          if (pos_ + 4 > s_.size()) return Err("bad \\u escape");
          unsigned v = 0;
          for (int i = 0; i < 4; ++i) {
            const char h = s_[pos_++];
            v = v * 16 + (std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (std::tolower(h) - 'a' + 10));
          }
          out += static_cast<char>(v < 0x80 ? v : '?');
        } else {
          out += (e == 'n' ? '\n' : e == 't' ? '\t' : e);
        }
      } else {
        out += c;
      }
    }
    if (pos_ >= s_.size()) return Err("unterminated string");
    ++pos_;
    return out;
  }
  absl::StatusOr<JsonValue> Value(int depth) {
    if (depth > 8) return Err("nesting too deep");
    Ws();
    if (pos_ >= s_.size()) return Err("unexpected end");
    JsonValue v;
    const char c = s_[pos_];
    if (c == '{') {
      v.kind = JsonValue::kObject;
      ++pos_;
      Ws();
      if (pos_ < s_.size() && s_[pos_] == '}') {
        ++pos_;
        return v;
      }
      for (;;) {
        Ws();
        auto key = String();
        if (!key.ok()) return key.status();
        Ws();
        if (pos_ >= s_.size() || s_[pos_] != ':') return Err("expected ':'");
        ++pos_;
        auto val = Value(depth + 1);
        if (!val.ok()) return val;
        v.keys.push_back(std::move(*key));
        v.values.push_back(std::move(*val));
        Ws();
        if (pos_ < s_.size() && s_[pos_] == ',') {
          ++pos_;
          continue;
        }
        if (pos_ < s_.size() && s_[pos_] == '}') {
          ++pos_;
          return v;
        }
        return Err("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.kind = JsonValue::kArray;
      ++pos_;
      Ws();
      if (pos_ < s_.size() && s_[pos_] == ']') {
        ++pos_;
        return v;
      }
      for (;;) {
        auto val = Value(depth + 1);
        if (!val.ok()) return val;
        v.array.push_back(std::move(*val));
        Ws();
        if (pos_ < s_.size() && s_[pos_] == ',') {
          ++pos_;
          continue;
        }
        if (pos_ < s_.size() && s_[pos_] == ']') {
          ++pos_;
          return v;
        }
        return Err("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.kind = JsonValue::kString;
      auto s = String();
      if (!s.ok()) return s.status();
      v.str = std::move(*s);
      return v;
    }
    const size_t start = pos_;
    if (s_[pos_] == '-') ++pos_;
    while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) ++pos_;
    if (!absl::SimpleAtoi(s_.substr(start, pos_ - start), &v.number)) return Err("expected an integer");
    v.kind = JsonValue::kNumber;
    return v;
  }
  const std::string& s_;
  size_t pos_ = 0;
};

size_t ElementSize(DType t) { return t == DType::kF32 ? 4 : 8; }

}  // namespace

std::string SerializeSafetensors(const SafetensorsFile& file) {
  std::string data;
  std::vector<std::string> entries;
  for (const auto& [name, t] : file.tensors) {
    const size_t begin = data.size();
    if (t.dtype == DType::kF32) {
      data.append(reinterpret_cast<const char*>(t.f32.data()), t.f32.size() * 4);
    } else {
      data.append(reinterpret_cast<const char*>(t.i64.data()), t.i64.size() * 8);
    }
    entries.push_back(absl::StrCat(JsonString(name), ":{\"dtype\":\"", t.dtype == DType::kF32 ? "F32" : "I64",
                                   "\",\"shape\":[", absl::StrJoin(t.shape, ","), "],\"data_offsets\":[", begin, ",",
                                   data.size(), "]}"));
  }
  std::map<std::string, std::string> meta = file.metadata;
  meta["lmsgd_crc32"] = absl::StrCat(Crc32(data));
  std::vector<std::string> m;
  for (const auto& [k, v] : meta) m.push_back(absl::StrCat(JsonString(k), ":", JsonString(v)));
  std::string header = absl::StrCat("{\"__metadata__\":{", absl::StrJoin(m, ","), "}",
                                    entries.empty() ? "" : ",", absl::StrJoin(entries, ","), "}");
  while ((header.size() + 8) % 8 != 0) header += ' ';
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += header;
  out += data;
  return out;
}

absl::StatusOr<SafetensorsFile> ParseSafetensors(const std::string& bytes, const std::string& name,
                                                 bool require_crc) {
  auto bad = [&](const std::string& what) {
    return absl::DataLossError(absl::StrCat("checkpoint '", name, "' is corrupt: ", what));
  };
  if (bytes.size() < 8) return bad(absl::StrCat("only ", bytes.size(), " bytes"));
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  if (n > bytes.size() - 8 || n > (100u << 20)) return bad(absl::StrCat("header length ", n, " exceeds the file"));
  const std::string header = bytes.substr(8, n);
  const char* data = bytes.data() + 8 + n;
  const size_t data_size = bytes.size() - 8 - n;
  auto json = JsonParser(header).Parse();
  if (!json.ok()) return bad(std::string(json.status().message()));
  if (json->kind != JsonValue::kObject) return bad("header is not a JSON object");
  SafetensorsFile out;
  size_t covered = 0;
  for (size_t m = 0; m < json->keys.size(); ++m) {
    const std::string& key = json->keys[m];
    const JsonValue& v = json->values[m];
    if (key == "__metadata__") {
      if (v.kind != JsonValue::kObject) return bad("__metadata__ is not an object");
      for (size_t j = 0; j < v.keys.size(); ++j) {
        const std::string& mk = v.keys[j];
        const JsonValue& mv = v.values[j];
        if (mv.kind != JsonValue::kString) return bad(absl::StrCat("metadata '", mk, "' is not a string"));
        out.metadata[mk] = mv.str;
      }
      continue;
    }
    if (v.kind != JsonValue::kObject) return bad(absl::StrCat("entry '", key, "' is not an object"));
    const JsonValue *dtype = nullptr, *shape = nullptr, *offsets = nullptr;
    for (size_t j = 0; j < v.keys.size(); ++j) {
      const std::string& fk = v.keys[j];
      const JsonValue& fv = v.values[j];
      if (fk == "dtype") dtype = &fv;
      if (fk == "shape") shape = &fv;
      if (fk == "data_offsets") offsets = &fv;
    }
    if (!dtype || !shape || !offsets || dtype->kind != JsonValue::kString || shape->kind != JsonValue::kArray ||
        offsets->kind != JsonValue::kArray || offsets->array.size() != 2) {
      return bad(absl::StrCat("entry '", key, "' lacks dtype/shape/data_offsets"));
    }
    Tensor t;
    if (dtype->str == "F32") {
      t.dtype = DType::kF32;
    } else if (dtype->str == "I64") {
      t.dtype = DType::kI64;
    } else {
      return bad(absl::StrCat("tensor '", key, "' has unsupported dtype ", dtype->str));
    }
    int64_t count = 1;
    for (const auto& d : shape->array) {
      if (d.kind != JsonValue::kNumber || d.number < 0 || d.number > (int64_t{1} << 40)) {
        return bad(absl::StrCat("tensor '", key, "' has a bad shape"));
      }
      t.shape.push_back(d.number);
      count *= d.number;
      if (count > (int64_t{1} << 40)) return bad(absl::StrCat("tensor '", key, "' is too large"));
    }
    const int64_t begin = offsets->array[0].number, end = offsets->array[1].number;
    if (offsets->array[0].kind != JsonValue::kNumber || offsets->array[1].kind != JsonValue::kNumber || begin < 0 ||
        end < begin || static_cast<uint64_t>(end) > data_size ||
        static_cast<uint64_t>(end - begin) != static_cast<uint64_t>(count) * ElementSize(t.dtype)) {
      return bad(absl::StrCat("tensor '", key, "' has data_offsets [", begin, ", ", end, ") inconsistent with shape/dtype or the ",
                              data_size, "-byte data section"));
    }
    covered += static_cast<size_t>(end - begin);
    if (t.dtype == DType::kF32) {
      t.f32.resize(static_cast<size_t>(count));
      std::memcpy(t.f32.data(), data + begin, static_cast<size_t>(end - begin));
    } else {
      t.i64.resize(static_cast<size_t>(count));
      std::memcpy(t.i64.data(), data + begin, static_cast<size_t>(end - begin));
    }
    out.tensors[key] = std::move(t);
  }
  if (covered != data_size) return bad(absl::StrCat("tensors cover ", covered, " of ", data_size, " data bytes"));
  auto crc = out.metadata.find("lmsgd_crc32");
  if (crc == out.metadata.end() && require_crc) return bad("no lmsgd_crc32 in its metadata");
  if (crc != out.metadata.end()) {
    const uint32_t actual = Crc32(absl::string_view(data, data_size));
    if (crc->second != absl::StrCat(actual)) {
      return bad(absl::StrCat("data CRC-32 ", actual, " does not match the recorded ", crc->second));
    }
  }
  return out;
}

absl::Status WriteSafetensors(const std::string& path, const SafetensorsFile& file) {
  return WriteFileAtomically(path, SerializeSafetensors(file));
}

absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path, bool require_crc) {
  auto bytes = ReadFileToString(path);
  if (!bytes.ok()) return bytes.status();
  return ParseSafetensors(*bytes, path, require_crc);
}

}  // namespace lmsgd::checkpoint
