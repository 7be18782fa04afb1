// Placeholder until the CPU kernels land.
