// Internals shared by layout.cpp and gather.cpp; not part of the shard API.
#pragma once

#include <cstddef>
#include <span>

#include "shard/layout.h"

namespace moetp::shard::detail {

// Copies the rows of `runs` (columns `cols` of dim 1) between a contiguous global buffer of
// `global_shape` and a contiguous local buffer of rows cols.width() columns wide.
// to_local: global -> local; otherwise local -> global. No checks: callers validate.
void copy_runs(char* global, char* local, const Shape& global_shape, ColumnRange cols, std::span<const Run> runs,
               size_t element_size, bool to_local);

}  // namespace moetp::shard::detail
