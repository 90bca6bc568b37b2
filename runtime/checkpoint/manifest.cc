#include "runtime/checkpoint/manifest.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace rally::checkpoint {
namespace {

using nlohmann::json;

constexpr const char* kFormatName = "rally-checkpoint";

// Field access that names what is wrong: "tensors[2].shards[0].offset: expected an unsigned
// integer, found string".
class Reader {
 public:
  Status error;

  const json* field(const json& obj, const std::string& path, const char* key) {
    if (!error.ok()) return nullptr;
    if (!obj.is_object()) {
      fail(path, "expected an object");
      return nullptr;
    }
    auto it = obj.find(key);
    if (it == obj.end()) {
      fail(path + "." + key, "missing");
      return nullptr;
    }
    return &*it;
  }
  std::uint64_t u64(const json& obj, const std::string& path, const char* key) {
    const json* v = field(obj, path, key);
    if (v == nullptr) return 0;
    if (!v->is_number_unsigned() && !(v->is_number_integer() && v->get<std::int64_t>() >= 0)) {
      fail(path + "." + key, "expected an unsigned integer, found " + std::string(v->type_name()));
      return 0;
    }
    return v->get<std::uint64_t>();
  }
  std::string str(const json& obj, const std::string& path, const char* key) {
    const json* v = field(obj, path, key);
    if (v == nullptr) return {};
    if (!v->is_string()) {
      fail(path + "." + key, "expected a string, found " + std::string(v->type_name()));
      return {};
    }
    return v->get<std::string>();
  }
  const json* array(const json& obj, const std::string& path, const char* key) {
    const json* v = field(obj, path, key);
    if (v == nullptr) return nullptr;
    if (!v->is_array()) {
      fail(path + "." + key, "expected an array, found " + std::string(v->type_name()));
      return nullptr;
    }
    return v;
  }
  std::vector<std::int64_t> dims(const json& obj, const std::string& path, const char* key) {
    std::vector<std::int64_t> out;
    const json* v = array(obj, path, key);
    if (v == nullptr) return out;
    for (const json& d : *v) {
      if (!d.is_number_integer() || d.get<std::int64_t>() < 0 ||
          d.get<std::int64_t>() > (std::int64_t{1} << 48)) {
        fail(path + "." + key, "expected integers between 0 and 2^48");
        return {};
      }
      out.push_back(d.get<std::int64_t>());
    }
    return out;
  }
  std::uint64_t hex(const json& obj, const std::string& path, const char* key) {
    const std::string s = str(obj, path, key);
    if (!error.ok()) return 0;
    return parseHex(s, path + "." + key);
  }
  std::uint64_t parseHex(const std::string& s, const std::string& path) {
    if (s.size() != 16 || s.find_first_not_of("0123456789abcdef") != std::string::npos) {
      fail(path, fmt::format("expected 16 lowercase hex digits, found '{}'", s));
      return 0;
    }
    return std::stoull(s, nullptr, 16);
  }
  void fail(const std::string& path, const std::string& what) {
    if (error.ok()) error = invalidArgument(fmt::format("manifest: {}: {}", path, what));
  }
};

}  // namespace

std::int64_t Box::elements() const {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

Box intersect(const Box& a, const Box& b) {
  Box out;
  for (size_t d = 0; d < a.shape.size() && d < b.shape.size(); ++d) {
    const std::int64_t lo = std::max(a.start[d], b.start[d]);
    const std::int64_t hi = std::min(a.start[d] + a.shape[d], b.start[d] + b.shape[d]);
    out.start.push_back(lo);
    out.shape.push_back(std::max<std::int64_t>(0, hi - lo));
  }
  return out;
}

std::string describe(const Box& b) {
  std::vector<std::string> parts;
  for (size_t d = 0; d < b.shape.size(); ++d) {
    parts.push_back(fmt::format("{}:{}", b.start[d], b.start[d] + b.shape[d]));
  }
  return fmt::format("[{}]", fmt::join(parts, ", "));
}

double ScalarRecord::asDouble() const {
  if (!is_double) return static_cast<double>(bits);
  double d;
  std::memcpy(&d, &bits, 8);
  return d;
}

const TensorRecord* Manifest::find(const std::string& name) const {
  for (const TensorRecord& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

std::uint64_t Manifest::totalBytes() const {
  std::uint64_t n = 0;
  for (const TensorRecord& t : tensors) {
    for (const ShardRecord& s : t.shards) n += s.bytes;
  }
  return n;
}

std::string checksumHex(std::uint64_t v) { return fmt::format("{:016x}", v); }

Result<DataType> parseDataType(std::string_view name) {
  for (DataType t : {DataType::kF32, DataType::kF64, DataType::kF16, DataType::kBF16,
                     DataType::kI32, DataType::kI64, DataType::kU8}) {
    if (collectives::dataTypeName(t) == name) return t;
  }
  return invalidArgument(
      fmt::format("unknown dtype '{}' (expected one of f32, f64, f16, bf16, i32, i64, u8)", name));
}

std::string toJson(const Manifest& m) {
  json scalars = json::object();
  for (const auto& [name, s] : m.scalars) {
    json v = {{"type", s.is_double ? "float64" : "int64"}, {"bits", s.bits}};
    if (s.is_double) v["value"] = s.asDouble();  // for people; "bits" is what is read back
    scalars[name] = v;
  }
  json tensors = json::array();
  for (const TensorRecord& t : m.tensors) {
    json shards = json::array();
    for (const ShardRecord& s : t.shards) {
      json blocks = json::array();
      for (std::uint64_t b : s.blocks) blocks.push_back(checksumHex(b));
      shards.push_back({{"rank", s.rank},
                        {"file", s.file},
                        {"offset", s.offset},
                        {"bytes", s.bytes},
                        {"start", s.box.start},
                        {"shape", s.box.shape},
                        {"checksum", checksumHex(s.checksum)},
                        {"blocks", blocks}});
    }
    tensors.push_back({{"name", t.name},
                       {"dtype", std::string(collectives::dataTypeName(t.type))},
                       {"shape", t.shape},
                       {"shards", shards}});
  }
  json files = json::array();
  for (const FileRecord& f : m.files) {
    files.push_back({{"name", f.name}, {"bytes", f.bytes}, {"rank", f.rank}});
  }
  json root = {{"format", kFormatName},
               {"version", m.version},
               {"step", m.step},
               {"commit", m.commit},
               {"created", m.created},
               {"checksum", "xxh3-64"},
               {"block_bytes", m.block_bytes},
               {"world_size", m.world_size},
               {"layout", m.layout},
               {"scalars", scalars},
               {"files", files},
               {"tensors", tensors}};
  return root.dump(1, ' ', false, json::error_handler_t::replace) + "\n";
}

Result<Manifest> parseManifest(const std::string& text) {
  json root = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return invalidArgument("manifest: not valid JSON (truncated or overwritten?)");
  }
  Reader r;
  Manifest m;
  if (r.str(root, "", "format") != kFormatName && r.error.ok()) {
    r.fail(".format", fmt::format("expected \"{}\"", kFormatName));
  }
  m.version = static_cast<int>(std::min<std::uint64_t>(r.u64(root, "", "version"), 1u << 30));
  if (r.error.ok() && m.version != kFormatVersion) {
    r.fail(".version", fmt::format("version {} is not supported (this build reads version {})",
                                   m.version, kFormatVersion));
  }
  if (r.error.ok() && r.str(root, "", "checksum") != "xxh3-64") {
    r.fail(".checksum", "expected \"xxh3-64\"");
  }
  m.step = r.u64(root, "", "step");
  m.commit = r.u64(root, "", "commit");
  m.created = r.str(root, "", "created");
  m.block_bytes = r.u64(root, "", "block_bytes");
  if (r.error.ok() && m.block_bytes == 0) r.fail(".block_bytes", "must be positive");
  m.world_size = static_cast<int>(std::min<std::uint64_t>(r.u64(root, "", "world_size"), 1u << 30));
  if (r.error.ok() && (m.world_size < 1 || m.world_size >= (1 << 30))) {
    r.fail(".world_size", "must be between 1 and 2^30");
  }
  m.layout = r.str(root, "", "layout");
  if (const json* scalars = r.field(root, "", "scalars"); scalars != nullptr) {
    if (!scalars->is_object()) r.fail(".scalars", "expected an object");
    for (auto it = scalars->begin(); r.error.ok() && it != scalars->end(); ++it) {
      const std::string path = ".scalars." + it.key();
      ScalarRecord s;
      const std::string type = r.str(it.value(), path, "type");
      if (r.error.ok() && type != "int64" && type != "float64") {
        r.fail(path + ".type", "expected \"int64\" or \"float64\", found \"" + type + "\"");
      }
      s.is_double = type == "float64";
      const json* bits = r.field(it.value(), path, "bits");
      if (bits != nullptr && !bits->is_number_integer())
        r.fail(path + ".bits", "expected an integer");
      if (r.error.ok()) s.bits = bits->get<std::int64_t>();
      m.scalars[it.key()] = s;
    }
  }
  std::map<std::string, std::uint64_t> file_bytes;
  if (const json* files = r.array(root, "", "files"); files != nullptr) {
    for (size_t i = 0; r.error.ok() && i < files->size(); ++i) {
      const std::string path = fmt::format(".files[{}]", i);
      FileRecord f;
      f.name = r.str((*files)[i], path, "name");
      f.bytes = r.u64((*files)[i], path, "bytes");
      f.rank = static_cast<int>(r.u64((*files)[i], path, "rank"));
      if (r.error.ok() &&
          (f.name.empty() || f.name.find('/') != std::string::npos || f.name[0] == '.')) {
        r.fail(path + ".name", "must be a plain file name within the checkpoint directory");
      }
      if (r.error.ok() && file_bytes.count(f.name) > 0) {
        r.fail(path + ".name", fmt::format("'{}' is listed twice", f.name));
      }
      file_bytes[f.name] = f.bytes;
      m.files.push_back(f);
    }
  }
  if (const json* tensors = r.array(root, "", "tensors"); tensors != nullptr) {
    for (size_t i = 0; r.error.ok() && i < tensors->size(); ++i) {
      const json& tj = (*tensors)[i];
      const std::string path = fmt::format(".tensors[{}]", i);
      TensorRecord t;
      t.name = r.str(tj, path, "name");
      const std::string dtype = r.str(tj, path, "dtype");
      if (r.error.ok()) {
        auto type = parseDataType(dtype);
        if (!type.ok()) {
          r.fail(path + ".dtype", type.status().message());
        } else {
          t.type = *type;
        }
      }
      t.shape = r.dims(tj, path, "shape");
      const json* shards = r.array(tj, path, "shards");
      for (size_t j = 0; shards != nullptr && r.error.ok() && j < shards->size(); ++j) {
        const json& sj = (*shards)[j];
        const std::string sp = fmt::format("{}.shards[{}]", path, j);
        ShardRecord s;
        s.rank = static_cast<int>(r.u64(sj, sp, "rank"));
        s.file = r.str(sj, sp, "file");
        s.offset = r.u64(sj, sp, "offset");
        s.bytes = r.u64(sj, sp, "bytes");
        s.box.start = r.dims(sj, sp, "start");
        s.box.shape = r.dims(sj, sp, "shape");
        s.checksum = r.hex(sj, sp, "checksum");
        if (const json* blocks = r.array(sj, sp, "blocks"); blocks != nullptr) {
          for (const json& b : *blocks) {
            if (!b.is_string()) {
              r.fail(sp + ".blocks", "expected hex strings");
              break;
            }
            s.blocks.push_back(r.parseHex(b.get<std::string>(), sp + ".blocks"));
          }
        }
        if (!r.error.ok()) break;
        // Consistency: inside the tensor, the right size, in a listed file, the right blocks.
        if (s.box.start.size() != t.shape.size() || s.box.shape.size() != t.shape.size()) {
          r.fail(sp, fmt::format("box {} has {} dimensions, the tensor {}", describe(s.box),
                                 s.box.shape.size(), t.shape.size()));
          break;
        }
        for (size_t d = 0; d < t.shape.size(); ++d) {
          if (s.box.start[d] + s.box.shape[d] > t.shape[d]) {
            r.fail(sp, fmt::format("box {} lies outside the tensor's shape [{}]", describe(s.box),
                                   fmt::join(t.shape, ", ")));
            break;
          }
        }
        std::uint64_t want = collectives::dataTypeSize(t.type);
        for (std::int64_t d : s.box.shape) {
          if (__builtin_mul_overflow(want, static_cast<std::uint64_t>(d), &want) ||
              want > (std::uint64_t{1} << 56)) {
            r.fail(sp, fmt::format("box {} is too large", describe(s.box)));
            break;
          }
        }
        for (const ShardRecord& other : t.shards) {
          if (r.error.ok() && !s.box.empty() && !intersect(s.box, other.box).empty()) {
            r.fail(sp, fmt::format("box {} overlaps box {} of the same tensor", describe(s.box),
                                   describe(other.box)));
          }
        }
        if (!r.error.ok()) break;
        if (r.error.ok() && s.bytes != want) {
          r.fail(sp + ".bytes", fmt::format("{} bytes for box {} of {}: expected {}", s.bytes,
                                            describe(s.box), dtype, want));
        }
        auto f = file_bytes.find(s.file);
        if (r.error.ok() && f == file_bytes.end()) {
          r.fail(sp + ".file", fmt::format("'{}' is not listed in .files", s.file));
        } else if (r.error.ok() && s.offset + s.bytes > f->second) {
          r.fail(sp, fmt::format("bytes [{}, {}) lie past the end of '{}' ({} bytes)", s.offset,
                                 s.offset + s.bytes, s.file, f->second));
        }
        const std::uint64_t nblocks = (s.bytes + m.block_bytes - 1) / m.block_bytes;
        if (r.error.ok() && s.blocks.size() != nblocks) {
          r.fail(sp + ".blocks", fmt::format("{} block checksums for {} bytes in blocks of {}: "
                                             "expected {}",
                                             s.blocks.size(), s.bytes, m.block_bytes, nblocks));
        }
        t.shards.push_back(std::move(s));
      }
      if (r.error.ok() && m.find(t.name) != nullptr) {
        r.fail(path + ".name", fmt::format("'{}' is listed twice", t.name));
      }
      m.tensors.push_back(std::move(t));
    }
  }
  if (!r.error.ok()) return r.error;
  return m;
}

Result<Manifest> readManifest(const std::string& dir) {
  const std::string path = dir + "/" + kManifestName;
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return notFound(fmt::format("{} is missing: the checkpoint is incomplete", path));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return ioError(fmt::format("cannot open {}", path));
  std::ostringstream text;
  text << in.rdbuf();
  auto m = parseManifest(text.str());
  if (!m.ok()) {
    Status s = m.status();
    s.addContext("in " + path);
    return s;
  }
  return m;
}

}  // namespace rally::checkpoint
