#include "comm/mesh.h"

namespace moetp::comm {

int Mesh::data_parallel_size(int world_size, int ep, int etp) {
  MOETP_CHECK(world_size >= 1, "world size ({}) must be >= 1", world_size);
  MOETP_CHECK(ep >= 1, "ep ({}) must be >= 1", ep);
  MOETP_CHECK(etp >= 1, "etp ({}) must be >= 1", etp);
  MOETP_CHECK(world_size % (ep * etp) == 0, "world size ({}) % (ep ({}) * etp ({})) = {} != 0", world_size, ep, etp,
              world_size % (ep * etp));
  return world_size / (ep * etp);
}

Mesh::Mesh(Comm& world, int ep, int etp)
    : world_(world), D_(data_parallel_size(world.size(), ep, etp)), P_(ep), T_(etp),
      coords_(coords_of(world.rank(), ep, etp)) {
  const int g = world.rank();
  const auto [d, p, t] = coords_;
  // Keys order members by their coordinate inside the group, which is also the world order.
  ep_etp_ = world.split(d, p * T_ + t, "ep_etp");
  ep_ = world.split(d * T_ + t, p, "ep");
  etp_ = world.split(d * P_ + p, t, "etp");
  expert_dp_ = world.split(p * T_ + t, d, "expert_dp");
  MOETP_CHECK(ep_etp_->rank() == p * T_ + t && ep_->rank() == p && etp_->rank() == t && expert_dp_->rank() == d,
              "mesh split produced unexpected group ranks on world rank {}", g);
}

std::string Mesh::describe() const {
  return fmt::format("mesh W={} (D={}, P={}, T={}): rank {} = (d={}, p={}, t={})", world_.size(), D_, P_, T_,
                     world_.rank(), coords_.d, coords_.p, coords_.t);
}

}  // namespace moetp::comm
