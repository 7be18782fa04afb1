// Mesh group memberships for every (D, P, T) whose product is the job's world size, checked
// against etp_spec §2: g = d·(P·T) + p·T + t; ep_etp = same d, ep = same (d, t), etp = same (d, p),
// expert_dp = same (p, t); each group ordered by its own coordinate.
#include <gtest/gtest.h>

#include "comm/mesh.h"
#include "dist/mpi_env.h"

namespace moetp {
namespace {

using comm::Mesh;
using testing::world;

struct Layout {
  int D, P, T;
};

const Layout kLayouts[] = {{1, 1, 1}, {1, 2, 1}, {1, 1, 2}, {1, 2, 2}, {2, 2, 2}, {1, 4, 2}, {1, 2, 4},
                           {2, 1, 1}, {4, 1, 1}, {1, 4, 1}, {1, 1, 4}, {2, 2, 1}, {2, 1, 2}};

std::vector<int64_t> expected_members(const Layout& l, int d, int p, int t, const char* group) {
  std::vector<int64_t> m;
  const std::string g = group;
  for (int dd = 0; dd < l.D; ++dd) {
    for (int pp = 0; pp < l.P; ++pp) {
      for (int tt = 0; tt < l.T; ++tt) {
        const bool in = (g == "ep_etp" && dd == d) || (g == "ep" && dd == d && tt == t) ||
                        (g == "etp" && dd == d && pp == p) || (g == "expert_dp" && pp == p && tt == t);
        if (in) m.push_back(Mesh::global_rank(dd, pp, tt, l.P, l.T));
      }
    }
  }
  return m;  // ascending global rank == ascending group coordinate
}

TEST(Mesh, GroupMembershipsAtEveryLayoutOfThisWorldSize) {
  auto& w = world();
  int checked = 0;
  for (const Layout& l : kLayouts) {
    if (l.D * l.P * l.T != w.size()) continue;
    ++checked;
    Mesh mesh(w, l.P, l.T);
    SCOPED_TRACE(mesh.describe());
    EXPECT_EQ(mesh.dp_size(), l.D);
    const auto [d, p, t] = mesh.coords();
    EXPECT_EQ(Mesh::global_rank(d, p, t, l.P, l.T), w.rank());
    EXPECT_EQ(mesh.ep_etp().all_gather_scalar(w.rank()), expected_members(l, d, p, t, "ep_etp"));
    EXPECT_EQ(mesh.ep().all_gather_scalar(w.rank()), expected_members(l, d, p, t, "ep"));
    EXPECT_EQ(mesh.etp().all_gather_scalar(w.rank()), expected_members(l, d, p, t, "etp"));
    EXPECT_EQ(mesh.expert_dp().all_gather_scalar(w.rank()), expected_members(l, d, p, t, "expert_dp"));
    EXPECT_EQ(mesh.ep_etp().rank(), p * l.T + t);
    EXPECT_EQ(mesh.ep().size(), l.P);
    EXPECT_EQ(mesh.etp().size(), l.T);
    EXPECT_EQ(mesh.expert_dp().size(), l.D);
  }
  EXPECT_GT(checked, 0) << "no listed layout has world size " << w.size();
}

TEST(Mesh, TpPartnersAreNeighbours) {
  auto& w = world();
  if (w.size() % 2 != 0) GTEST_SKIP() << "needs an even world";
  Mesh mesh(w, 1, 2);
  const std::vector<int64_t> partners = mesh.etp().all_gather_scalar(w.rank());
  EXPECT_EQ(partners[1] - partners[0], 1);
}

TEST(MeshBadInput, IndivisibleAndNonPositiveSizesNameTheValues) {
  auto& w = world();
  auto message = [&](int ep, int etp) {
    try {
      Mesh mesh(w, ep, etp);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const std::string ws = std::to_string(w.size());
  EXPECT_NE(message(w.size() + 1, 1).find("world size (" + ws + ") % (ep (" + std::to_string(w.size() + 1) +
                                          ") * etp (1))"),
            std::string::npos);
  EXPECT_NE(message(0, 1).find("ep (0) must be >= 1"), std::string::npos);
  EXPECT_NE(message(1, -2).find("etp (-2) must be >= 1"), std::string::npos);
  // After the errors the world still works for everyone.
  EXPECT_EQ(w.all_reduce_scalar(int64_t{1}, comm::ReduceOp::kSum), w.size());
}

}  // namespace
}  // namespace moetp
