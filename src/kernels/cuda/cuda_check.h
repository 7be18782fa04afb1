// CUDA_CHECK for host code: a failed runtime call becomes a moetp::Error naming the call and the
// CUDA error string.
#pragma once

#include <cuda_runtime.h>

#include "core/check.h"

#define CUDA_CHECK(call) MOETP_STATUS_CHECK(call, cudaSuccess, cudaGetErrorString)
