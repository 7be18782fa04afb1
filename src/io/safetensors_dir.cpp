// Sharded safetensors checkpoints: the model.safetensors.index.json reader/writer and
// SafetensorsDir, which opens a single-file or sharded checkpoint directory (safetensors.h).
#include "core/check.h"
#include "io/safetensors.h"

namespace moetp::io {

namespace {

using nlohmann::json;

std::string join(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}

// A shard name must stay inside the checkpoint directory: relative, no ".." component.
bool stays_inside(const std::string& file) {
  if (file.empty() || file.front() == '/' || file.back() == '/') return false;
  size_t start = 0;
  while (start <= file.size()) {
    const size_t slash = std::min(file.find('/', start), file.size());
    if (file.compare(start, slash - start, "..") == 0 && slash - start == 2) return false;
    start = slash + 1;
  }
  return true;
}

void check_weight_map(const std::string& path, const std::map<std::string, std::string>& weight_map) {
  MOETP_CHECK(!weight_map.empty(), "{}: weight_map is empty", path);
  for (const auto& [tensor, file] : weight_map) {
    MOETP_CHECK(stays_inside(file),
                "{}: weight_map maps tensor '{}' to '{}', which is not a file name inside the directory", path, tensor,
                file);
  }
}

void check_total_size(const std::string& path, const std::map<std::string, json>& metadata) {
  auto it = metadata.find("total_size");
  MOETP_CHECK(it == metadata.end() || it->second.is_number_unsigned() ||
                  (it->second.is_number_integer() && it->second.get<int64_t>() >= 0),
              "{}: metadata total_size is {}, not a non-negative integer", path, it->second.dump());
}

}  // namespace

IndexFile read_index(const std::string& path) {
  const std::string text = read_text_file(path);
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    MOETP_FAIL("{}: not valid JSON: {}", path, e.what());
  }
  MOETP_CHECK(j.is_object(), "{}: is a JSON {}, not an object", path, j.type_name());
  IndexFile index;
  auto weight_map = j.find("weight_map");
  MOETP_CHECK(weight_map != j.end() && weight_map->is_object(), "{}: \"weight_map\" is {}, not an object", path,
              weight_map == j.end() ? std::string("missing") : std::string("a JSON ") + weight_map->type_name());
  for (const auto& [tensor, file] : weight_map->items()) {
    MOETP_CHECK(file.is_string(), "{}: weight_map maps tensor '{}' to {}, not a file name", path, tensor, file.dump());
    index.weight_map[tensor] = file.get<std::string>();
  }
  check_weight_map(path, index.weight_map);
  if (auto metadata = j.find("metadata"); metadata != j.end() && !metadata->is_null()) {
    MOETP_CHECK(metadata->is_object(), "{}: \"metadata\" is a JSON {}, not an object", path, metadata->type_name());
    for (const auto& [key, value] : metadata->items()) index.metadata[key] = value;
  }
  check_total_size(path, index.metadata);
  return index;
}

void write_index(const std::string& path, const IndexFile& index) {
  check_weight_map(path, index.weight_map);
  check_total_size(path, index.metadata);
  json j = json::object();
  j["metadata"] = json::object();
  for (const auto& [key, value] : index.metadata) j["metadata"][key] = value;
  j["weight_map"] = index.weight_map;
  std::string text;
  try {
    text = j.dump(2) + "\n";
  } catch (const json::exception& e) {
    MOETP_FAIL("write_index {}: cannot encode the index: {}", path, e.what());
  }
  AtomicFileWriter out(path);
  out.write(text.data(), text.size());
  out.commit();
}

SafetensorsDir SafetensorsDir::open(const std::string& dir) {
  SafetensorsDir d;
  d.dir_ = dir;
  const std::string single_path = join(dir, kSingleFileName);
  const std::string index_path = join(dir, kIndexFileName);
  MOETP_CHECK(!(is_regular_file(single_path) && is_regular_file(index_path)),
              "{}: has both {} and {}: which one holds the weights is ambiguous (a stale file from another save?); "
              "remove the one that does not belong",
              dir, kSingleFileName, kIndexFileName);
  if (is_regular_file(single_path)) {
    d.files_.push_back(SafetensorsFile::open(single_path));
    for (const TensorInfo& t : d.files_[0].tensors()) d.file_of_.emplace(t.name, 0);
    return d;
  }
  MOETP_CHECK(is_regular_file(index_path), "{}: has neither {} nor {}: not a safetensors checkpoint directory", dir,
              kSingleFileName, kIndexFileName);
  const IndexFile index = read_index(index_path);
  std::map<std::string, size_t> shard_idx;  // shard file name -> position in files_
  for (const auto& [tensor, file] : index.weight_map) {
    auto [it, inserted] = shard_idx.emplace(file, d.files_.size());
    if (inserted) {
      const std::string shard_path = join(dir, file);
      MOETP_CHECK(is_regular_file(shard_path), "{}: weight_map maps tensor '{}' to '{}', but {} does not exist",
                  index_path, tensor, file, shard_path);
      d.files_.push_back(SafetensorsFile::open(shard_path));
    }
    const SafetensorsFile& shard = d.files_[it->second];
    if (!shard.contains(tensor)) {
      std::vector<std::string> names;
      for (const TensorInfo& t : shard.tensors()) names.push_back(t.name);
      MOETP_FAIL("{}: weight_map maps tensor '{}' to '{}', but {} has no such tensor ({} tensors; similar: {})",
                 index_path, tensor, file, shard.path(), names.size(), similar_names(tensor, names));
    }
    d.file_of_.emplace(tensor, it->second);
  }
  return d;
}

const SafetensorsFile& SafetensorsDir::file_of(const std::string& name) const {
  auto it = file_of_.find(name);
  if (it == file_of_.end()) {
    MOETP_FAIL("{}: no tensor '{}' in the checkpoint ({} tensors; similar: {})", dir_, name, file_of_.size(),
               similar_names(name, names()));
  }
  return files_[it->second];
}

std::vector<std::string> SafetensorsDir::names() const {
  std::vector<std::string> out;
  out.reserve(file_of_.size());
  for (const auto& [name, file_idx] : file_of_) out.push_back(name);
  return out;
}

}  // namespace moetp::io
