"""Choosing leaves and storage for every candidate block: the optimiser and its baselines.

A `Plan` says which candidate blocks become leaves and how each is stored. Three planners share
the same candidates (see `candidates.py`):

- `optimal_plan`: minimise total bytes subject to total squared error <= budget, by Lagrangian
  relaxation (bytes + mu * error, bottom-up over the quad-tree, bisection on mu) followed by a
  greedy pass that spends what is left of the budget;
- `paper_plan`: the seed paper's Algorithm 1 (uniform local threshold, subdivide blocks whose
  low-rank approximation misses it or saves no space);
- `svd_plan`: one truncated SVD of the whole matrix.

Blocks are disjoint, so the total squared error is exactly the sum of the leaves' squared errors;
the estimates here are checked by measuring the built matrix (see `build.py`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .candidates import BLOCK_ROW_BYTES, SEGMENT_ROW_BYTES, Candidates

DROP = -1  # triplet choice: not stored


@dataclasses.dataclass
class Plan:
    """Leaves (node ids) and their storage; ``trip_choice`` is a codec index or DROP."""

    leaves: np.ndarray
    dense_codec: np.ndarray  # per leaf: codec index of a dense leaf, DROP for a low-rank leaf
    trip_choice: np.ndarray  # per triplet of the candidates (only those of low-rank leaves count)
    strategy: str

    def leaf_mask(self, c: Candidates) -> np.ndarray:
        mask = np.zeros(c.tree.size, dtype=bool)
        mask[self.leaves[self.dense_codec == DROP]] = True
        return mask

    def error(self, c: Candidates) -> float:
        """Estimated total squared error."""
        dense = self.dense_codec != DROP
        err = float(c.dense_err[self.dense_codec[dense], self.leaves[dense]].sum())
        active = self.leaf_mask(c)[c.trip_node]
        choice = self.trip_choice[active]
        kept = choice != DROP
        idx = np.flatnonzero(active)
        err += float(c.trip_sigma2[idx[~kept]].sum())
        err += float(c.trip_err[choice[kept], idx[kept]].sum())
        return err

    def nbytes(self, c: Candidates) -> int:
        """Exact bytes of the packed matrix this plan builds."""
        dense = self.dense_codec != DROP
        total = BLOCK_ROW_BYTES * len(self.leaves)
        total += float(c.dense_bytes[self.dense_codec[dense], self.leaves[dense]].sum())
        active = np.flatnonzero(self.leaf_mask(c)[c.trip_node])
        choice = self.trip_choice[active]
        kept = choice != DROP
        total += float(c.trip_bytes[choice[kept], active[kept]].sum())
        segments = np.unique(np.stack([c.trip_node[active[kept]], choice[kept]]), axis=1).shape[1]
        return int(round(total)) + SEGMENT_ROW_BYTES * segments


def _lagrangian(c: Candidates, mu: float, scale: float) -> Plan:
    """The plan minimising bytes + mu * error / scale over all partitions and storage choices."""
    tree = c.tree
    keep_cost = c.trip_bytes + (mu / scale) * c.trip_err
    best_codec = np.argmin(keep_cost, axis=0)
    best_keep = keep_cost[best_codec, np.arange(keep_cost.shape[1])]
    drop_cost = (mu / scale) * c.trip_sigma2
    keep = best_keep < drop_cost
    trip_cost = np.where(keep, best_keep, drop_cost)
    kept_any = np.bincount(c.trip_node, weights=keep, minlength=tree.size) > 0
    lowrank = (BLOCK_ROW_BYTES + SEGMENT_ROW_BYTES * kept_any
               + np.bincount(c.trip_node, weights=trip_cost, minlength=tree.size))
    dense_cost_all = c.dense_bytes + (mu / scale) * c.dense_err
    dense_codec = np.argmin(dense_cost_all, axis=0)
    dense = BLOCK_ROW_BYTES + dense_cost_all[dense_codec, np.arange(tree.size)]
    leaf_cost = np.minimum(lowrank, dense)
    best = leaf_cost.copy()
    is_leaf = np.ones(tree.size, dtype=bool)
    for level in range(tree.depth - 1, 0, -1):
        nodes = tree.nodes_of_level(level)
        child_sum = np.bincount(tree.parent[nodes.start:nodes.stop], weights=best[nodes.start:nodes.stop],
                                minlength=tree.size)
        parents = np.unique(tree.parent[nodes.start:nodes.stop])
        split = child_sum[parents] < leaf_cost[parents]
        best[parents[split]] = child_sum[parents[split]]
        is_leaf[parents[split]] = False
    leaves = _select(c, is_leaf)
    is_dense = dense[leaves] <= lowrank[leaves]
    choice = np.where(keep, best_codec, DROP)
    return Plan(leaves, np.where(is_dense, dense_codec[leaves], DROP), choice, "optimal")


def _select(c: Candidates, is_leaf: np.ndarray) -> np.ndarray:
    """Top-down: the leaves reached from the root through non-leaf nodes."""
    tree = c.tree
    active = np.zeros(tree.size, dtype=bool)
    active[0] = True
    for level in range(1, tree.depth):
        nodes = np.arange(tree.level_start[level], tree.level_start[level + 1])
        parents = tree.parent[nodes]
        active[nodes] = active[parents] & ~is_leaf[parents]
    return np.flatnonzero(active & is_leaf)


def optimal_plan(c: Candidates, budget: float) -> Plan:
    """Cheapest plan found within ``budget`` (squared error): Lagrangian bisection + greedy."""
    scale = budget if budget > 0 else 1.0
    total_dense = float(c.dense_bytes[0, 0])
    if budget <= 0:
        return _spend(c, _lagrangian(c, 1e300, scale), budget)
    lo, hi = np.log(1e-6), np.log(max(total_dense, 1.0) * 1e15)
    plan = _lagrangian(c, np.exp(lo), scale)
    if plan.error(c) <= budget:
        return _spend(c, plan, budget)
    best = _lagrangian(c, np.exp(hi), scale)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        plan = _lagrangian(c, np.exp(mid), scale)
        if plan.error(c) <= budget:
            hi, best = mid, plan
        else:
            lo = mid
        if hi - lo < 1e-4:
            break
    return _spend(c, best, budget)


def _spend(c: Candidates, plan: Plan, budget: float, rounds: int = 4) -> Plan:
    """Spend leftover budget greedily: cheaper storage for the triplets that lose least per byte."""
    choice = plan.trip_choice.copy()
    active = np.flatnonzero(plan.leaf_mask(c)[c.trip_node])
    if len(active) == 0:
        return plan
    # options per active triplet: column 0 = drop, 1.. = codecs
    opt_bytes = np.vstack([np.zeros(len(active)), c.trip_bytes[:, active]])
    opt_err = np.vstack([c.trip_sigma2[active], c.trip_err[:, active]])
    for _ in range(rounds):
        slack = budget - Plan(plan.leaves, plan.dense_codec, choice, plan.strategy).error(c)
        if slack <= 0:
            break
        current = choice[active] + 1
        cols = np.arange(len(active))
        saved = opt_bytes[current, cols] - opt_bytes
        added = opt_err - opt_err[current, cols]
        valid = (saved > 0) & np.isfinite(added)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(valid, saved / np.maximum(added, 1e-300), -np.inf)
        move = np.argmax(ratio, axis=0)
        gain = ratio[move, cols]
        candidates = np.flatnonzero(np.isfinite(gain) & (gain > -np.inf))
        if len(candidates) == 0:
            break
        order = candidates[np.argsort(-gain[candidates], kind="stable")]
        cost = np.maximum(added[move[order], order], 0)
        within = np.cumsum(cost) <= slack
        if not within.any():
            break
        chosen = order[within]
        choice[active[chosen]] = move[chosen] - 1
    return Plan(plan.leaves, plan.dense_codec, choice, plan.strategy)


def _node_triplets(c: Candidates) -> np.ndarray:
    """Start of each node's run of triplets in the flat arrays (plus the end)."""
    counts = np.bincount(c.trip_node, minlength=c.tree.size)
    return np.concatenate([[0], np.cumsum(counts)])


def _prefix_rank(c: Candidates, node: int, starts: np.ndarray, allowed: float) -> tuple[int, float]:
    """Smallest rank whose truncation (plus codec-0 rounding of what is kept) is within ``allowed``."""
    run = slice(starts[node], starts[node + 1])
    sigma2 = c.trip_sigma2[run]
    tails = np.concatenate([np.cumsum(sigma2[::-1])[::-1], [0.0]])
    kept = np.concatenate([[0.0], np.cumsum(c.trip_err[0, run])])
    errors = tails + kept
    fits = np.flatnonzero(errors <= allowed)
    rank = int(fits[0]) if len(fits) else len(sigma2)
    return rank, float(errors[rank])


def _rank_plan(c: Candidates, leaves: list[int], ranks: dict[int, int], strategy: str) -> Plan:
    """A plan from low-rank leaves (given ranks, codec 0) and dense leaves (rank absent)."""
    leaves_arr = np.array(sorted(leaves), dtype=np.int64)
    dense_codec = np.array([DROP if n in ranks else 0 for n in leaves_arr], dtype=np.int64)
    choice = np.full(len(c.trip_node), DROP, dtype=np.int64)
    starts = _node_triplets(c)
    for node, rank in ranks.items():
        choice[starts[node]:starts[node] + rank] = 0
    return Plan(leaves_arr, dense_codec, choice, strategy)


def svd_plan(c: Candidates, budget: float) -> Plan:
    """One truncated SVD of the whole matrix, in the source dtype, at the smallest rank that fits."""
    rank, _ = _prefix_rank(c, 0, _node_triplets(c), budget)
    return _rank_plan(c, [0], {0: rank}, "svd")


def paper_plan(c: Candidates, budget: float) -> Plan:
    """The seed's Algorithm 1 with the global bound ||W - H||_F <= tau * sqrt(n_blocks).

    Start from the whole matrix; give every block the threshold tau² = budget / n_blocks; a block
    whose low-rank approximation within tau saves no space is subdivided (or stored dense if it
    cannot be); repeat with the new block count until nothing changes.
    """
    tree, starts = c.tree, _node_triplets(c)
    children: dict[int, list[int]] = {}
    for node in range(1, tree.size):
        children.setdefault(int(tree.parent[node]), []).append(node)
    leaves, ranks = [0], {}
    while True:
        tau2 = budget / len(leaves)
        new_leaves, ranks, changed = [], {}, False
        for node in leaves:
            rank, _ = _prefix_rank(c, node, starts, tau2)
            lowrank_bytes = rank * c.trip_bytes[0, starts[node]] if rank else 0.0
            if lowrank_bytes < c.dense_bytes[0, node]:
                ranks[node] = rank
                new_leaves.append(node)
            elif node in children:
                new_leaves.extend(children[node])
                changed = True
            else:
                new_leaves.append(node)
        leaves = new_leaves
        if not changed:
            return _rank_plan(c, leaves, ranks, "paper")
