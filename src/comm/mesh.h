// The process mesh of etp_spec §2. World rank g = d·(P·T) + p·T + t: etp varies fastest so that
// TP partners are neighbours (same node, NVLink).
//
//   group      members          used for
//   world      all W            data parallelism of non-expert params, loss normalisation
//   ep_etp     same d (P·T)     virtual-expert and all-gather dispatch; group rank r = p·T + t
//   ep         same d, t (P)    EP all-to-all
//   etp        same d, p (T)    TP all-gather / reduce-scatter of expert rows
//   expert_dp  same p, t (D)    gradient all-reduce of expert shards
//
// Construction is collective over `world` (it splits communicators).
#pragma once

#include <memory>
#include <string>

#include "comm/comm.h"

namespace moetp::comm {

struct MeshCoords {
  int d = 0;
  int p = 0;
  int t = 0;
};

class Mesh {
 public:
  // D = W / (P·T). Throws (on every rank alike) when sizes are invalid.
  Mesh(Comm& world, int ep, int etp);

  // Validates (W, P, T) and returns D; the message names the values. Pure, no communication.
  static int data_parallel_size(int world_size, int ep, int etp);
  static int global_rank(int d, int p, int t, int ep, int etp) { return d * (ep * etp) + p * etp + t; }
  static MeshCoords coords_of(int global_rank, int ep, int etp) {
    return {global_rank / (ep * etp), (global_rank / etp) % ep, global_rank % etp};
  }

  int dp_size() const { return D_; }
  int ep_size() const { return P_; }
  int etp_size() const { return T_; }
  const MeshCoords& coords() const { return coords_; }

  Comm& world() const { return world_; }
  Comm& ep_etp() const { return *ep_etp_; }
  Comm& ep() const { return *ep_; }
  Comm& etp() const { return *etp_; }
  Comm& expert_dp() const { return *expert_dp_; }

  // "mesh W=8 (D=2, P=2, T=2): rank 5 = (d=1, p=0, t=1)"
  std::string describe() const;

 private:
  Comm& world_;
  int D_, P_, T_;
  MeshCoords coords_;
  std::unique_ptr<Comm> ep_etp_, ep_, etp_, expert_dp_;
};

}  // namespace moetp::comm
