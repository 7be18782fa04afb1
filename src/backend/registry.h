// The backends this build has (registry.cpp picks them; only it knows whether CUDA is built).
#pragma once

#include "backend/backend.h"

namespace moetp::backend {

Backend& cpu_backend();   // cpu_backend.cpp
Backend& cuda_backend();  // cuda_backend.cpp, CUDA builds only

}  // namespace moetp::backend
