// CUDA runtime glue, callable from host code that does not include CUDA headers.
// init() registers the CUDA device hooks with core (allocation, copies) for the current device.
#pragma once

#include <string>

namespace moetp::cuda {

// Number of visible CUDA devices; 0 when there is no driver or no GPU (never throws).
int device_count();
// Why device_count() is 0, for skip messages ("no CUDA driver", "no device", ...).
std::string unavailable_reason();
// Selects `device` and registers the hooks; throws moetp::Error naming the device and the cause.
void init(int device);

}  // namespace moetp::cuda
