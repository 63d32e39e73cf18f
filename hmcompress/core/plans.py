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
import sys

import numpy as np

from hmcompress.core.candidates import BLOCK_ROW_BYTES, SEGMENT_ROW_BYTES, Candidates, Items
from hmcompress.runtime import DENSE, LOWRANK, ROWS, Kind

DROP = -1  # item choice: not stored


@dataclasses.dataclass
class Plan:
    """Leaves (node ids), how each is stored, and the codec (or DROP) of every item.

    ``trip_choice`` covers all triplets and ``row_choice`` all rows of the candidates; only the
    items of low-rank leaves (triplets) and of rows leaves (rows) are stored.
    """

    leaves: np.ndarray
    kind: np.ndarray  # per leaf: its `Kind` (DENSE, LOWRANK or ROWS), as the segments store it
    dense_codec: np.ndarray  # per leaf: codec index of a dense leaf, else DROP
    trip_choice: np.ndarray
    row_choice: np.ndarray
    strategy: str

    def families(self, c: Candidates) -> list[tuple[Items, np.ndarray, np.ndarray]]:
        """(items, choice, indices of the items that belong to leaves of the family's kind)."""
        out = []
        for items, choice, kind in ((c.triplets, self.trip_choice, LOWRANK),
                                    (c.rows, self.row_choice, ROWS)):
            mask = np.zeros(c.tree.size, dtype=bool)
            mask[self.leaves[self.kind == kind]] = True
            out.append((items, choice, np.flatnonzero(mask[items.node])))
        return out

    def error(self, c: Candidates) -> float:
        """Estimated total squared error."""
        dense = self.kind == DENSE
        err = float(c.dense_err[self.dense_codec[dense], self.leaves[dense]].sum())
        for items, choice, active in self.families(c):
            chosen = choice[active]
            kept = chosen != DROP
            err += float(items.drop_err[active[~kept]].sum())
            err += float(items.err[chosen[kept], active[kept]].sum())
        return err

    def nbytes(self, c: Candidates) -> int:
        """Bytes of the packed matrix this plan builds, as priced: exact for tables and floats,
        integer codes at their estimated coded size (`core.pricing`)."""
        dense = self.kind == DENSE
        total = BLOCK_ROW_BYTES * len(self.leaves)
        total += float(c.dense_bytes[self.dense_codec[dense], self.leaves[dense]].sum())
        for family, (items, choice, active) in enumerate(self.families(c)):
            chosen = choice[active]
            kept = chosen != DROP
            total += float(items.nbytes[chosen[kept], active[kept]].sum())
            nodes = np.unique(np.stack([items.node[active[kept]], chosen[kept]]), axis=1)[0]
            total += SEGMENT_ROW_BYTES * len(nodes)
            if family == 1:  # rows segments carry a bitmap of their rows
                total += float(((c.tree.rows[nodes] + 7) // 8).sum())
        return int(round(total))


def _family_cost(items: Items, mu: float, n_nodes: int,
                 segment_bytes: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Per node: the cheapest bytes + mu * error of storing its items (inf if it has none).

    ``segment_bytes`` (per node) is what one stored segment costs besides its items.
    """
    keep_cost = items.nbytes + mu * items.err
    best_codec = np.argmin(keep_cost, axis=0) if len(items.node) else np.zeros(0, dtype=np.int64)
    best_keep = keep_cost[best_codec, np.arange(keep_cost.shape[1])]
    drop_cost = mu * items.drop_err
    keep = best_keep < drop_cost
    cost = np.bincount(items.node, weights=np.where(keep, best_keep, drop_cost),
                       minlength=n_nodes).astype(np.float64)
    cost += segment_bytes * (np.bincount(items.node, weights=keep, minlength=n_nodes) > 0)
    cost[np.bincount(items.node, minlength=n_nodes) == 0] = np.inf
    return cost, np.where(keep, best_codec, DROP)


def _lagrangian(c: Candidates, mu: float) -> Plan:
    """The plan minimising bytes + mu * error over all partitions and storage choices."""
    tree = c.tree
    lowrank, trip_choice = _family_cost(c.triplets, mu, tree.size, SEGMENT_ROW_BYTES)
    rows, row_choice = _family_cost(c.rows, mu, tree.size, SEGMENT_ROW_BYTES + (tree.rows + 7) // 8)
    dense_all = c.dense_bytes + mu * c.dense_err
    dense_codec = np.argmin(dense_all, axis=0)
    dense = dense_all[dense_codec, np.arange(tree.size)]
    options = np.stack([{DENSE: dense, LOWRANK: lowrank, ROWS: rows}[k] for k in Kind])  # row k: Kind k
    kind = np.argmin(options, axis=0)
    leaf_cost = BLOCK_ROW_BYTES + options[kind, np.arange(tree.size)]
    best = leaf_cost.copy()
    is_leaf = np.ones(tree.size, dtype=bool)
    for level in range(tree.depth - 1, 0, -1):
        nodes = slice(tree.level_start[level], tree.level_start[level + 1])
        child_sum = np.bincount(tree.parent[nodes], weights=best[nodes], minlength=tree.size)
        parents = np.unique(tree.parent[nodes])
        split = child_sum[parents] < leaf_cost[parents]
        best[parents[split]] = child_sum[parents[split]]
        is_leaf[parents[split]] = False
    leaves = _select(c, is_leaf)
    leaf_kind = kind[leaves]
    codec = np.where(leaf_kind == DENSE, dense_codec[leaves], DROP)
    return Plan(leaves, leaf_kind, codec, trip_choice, row_choice, "optimal")


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


def _per_budget(c: Candidates, budget: float) -> Candidates:
    """The candidates with every error expressed in units of the budget."""
    def scaled(items: Items) -> Items:
        return dataclasses.replace(items, err=items.err / budget, drop_err=items.drop_err / budget)
    return dataclasses.replace(c, dense_err=c.dense_err / budget, triplets=scaled(c.triplets),
                               rows=scaled(c.rows))


def optimal_plan(c: Candidates, budget: float) -> Plan:
    """Cheapest plan found within ``budget`` (squared error): Lagrangian bisection + greedy.

    Lagrangian solutions lie on the lower convex hull of (error, bytes), so the bisection ends
    between a feasible plan and a cheaper infeasible one, and the best plan may lie between them.
    Both are finished greedily: the feasible one spends its leftover budget, the infeasible one
    buys back error at the fewest bytes per unit until it fits (then spends what is left); the
    cheaper result wins. Errors are in units of the budget, so mu is in bytes per budget.
    """
    if budget <= 0:
        return _lagrangian(c, 1e300)
    unit = _per_budget(c, min(budget, sys.float_info.max))  # a tolerance whose square overflows: any plan fits
    lo, hi = np.log(1e-6), np.log(max(float(c.dense_bytes[0, 0]), 1.0) * 1e15)
    plan = _lagrangian(unit, np.exp(lo))
    if plan.error(unit) <= 1:
        return _Moves(unit, plan).spend(1.0)
    below, plan = plan, _lagrangian(unit, np.exp(hi))
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        trial = _lagrangian(unit, np.exp(mid))
        if trial.error(unit) <= 1:
            hi, plan = mid, trial
        else:
            lo, below = mid, trial
        if hi - lo < 1e-3:
            break
    finished = [_Moves(unit, plan).spend(1.0)]
    moves = _Moves(unit, below)
    if moves.repair(1.0).error(unit) <= 1:
        finished.append(moves.spend(1.0))  # the same moves go on from the repaired choices
    return min(finished, key=lambda p: p.nbytes(unit))


class _Moves:
    """Per-item storage changes within a plan's partition: drop, or keep in another codec."""

    def __init__(self, c: Candidates, plan: Plan) -> None:
        self.c, self.plan = c, plan
        self.families = plan.families(c)
        self.choices = [choice.copy() for _, choice, _ in self.families]
        # options per active item: row 0 = drop, rows 1.. = codecs
        self.bytes = np.hstack([np.vstack([np.zeros(len(a)), it.nbytes[:, a]]) for it, _, a in self.families])
        self.err = np.hstack([np.vstack([it.drop_err[a], it.err[:, a]]) for it, _, a in self.families])
        self.bounds = np.cumsum([0] + [len(a) for _, _, a in self.families])
        self.cols = np.arange(self.bytes.shape[1])

    def current_plan(self) -> Plan:
        return dataclasses.replace(self.plan, trip_choice=self.choices[0], row_choice=self.choices[1])

    def _best_moves(self, gain: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per item the option with the most ``gain`` per ``cost`` (both positive); items by rate."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # free moves rate inf
            rate = np.where((gain > 0) & np.isfinite(cost) & np.isfinite(gain),
                            gain / np.maximum(cost, 1e-300), -np.inf)
        move = np.argmax(rate, axis=0)
        best = rate[move, self.cols]
        movable = np.flatnonzero(best > -np.inf)
        return move, movable[np.argsort(-best[movable], kind="stable")]

    def _apply(self, chosen: np.ndarray, move: np.ndarray) -> None:
        for f, (_, _, active) in enumerate(self.families):
            mine = chosen[(chosen >= self.bounds[f]) & (chosen < self.bounds[f + 1])]
            self.choices[f][active[mine - self.bounds[f]]] = move[mine] - 1

    def _current(self) -> np.ndarray:
        return np.concatenate([ch[a] for ch, (_, _, a) in zip(self.choices, self.families)]) + 1

    def spend(self, budget: float, rounds: int = 4) -> Plan:
        """Spend leftover budget: cheaper storage for the items that lose least error per byte saved."""
        for _ in range(rounds if len(self.cols) else 0):
            slack = budget - self.current_plan().error(self.c)
            if slack <= 0:
                break
            current = self._current()
            added = self.err - self.err[current, self.cols]
            move, order = self._best_moves(self.bytes[current, self.cols] - self.bytes, added)
            within = np.cumsum(np.maximum(added[move[order], order], 0)) <= slack
            if not within.any():
                break
            self._apply(order[within], move)
        return self.current_plan()

    def repair(self, budget: float, rounds: int = 8) -> Plan:
        """Buy back error until the plan fits: the items that remove most error per byte added."""
        for _ in range(rounds if len(self.cols) else 0):
            deficit = self.current_plan().error(self.c) - budget
            if deficit <= 0:
                break
            current = self._current()
            removed = self.err[current, self.cols] - self.err
            move, order = self._best_moves(removed, self.bytes - self.bytes[current, self.cols])
            if not len(order):
                break
            gained = np.cumsum(removed[move[order], order])
            self._apply(order[:int(np.searchsorted(gained, deficit)) + 1], move)
        return self.current_plan()


def _prefix_rank(c: Candidates, node: int, starts: np.ndarray, allowed: float) -> int:
    """Smallest rank whose truncation (plus codec-0 rounding of what is kept) is within ``allowed``."""
    run = slice(starts[node], starts[node + 1])
    sigma2 = c.triplets.drop_err[run]
    tails = np.concatenate([np.cumsum(sigma2[::-1])[::-1], [0.0]])
    kept = np.concatenate([[0.0], np.cumsum(c.triplets.err[0, run])])
    fits = np.flatnonzero(tails + kept <= allowed)
    return int(fits[0]) if len(fits) else len(sigma2)


def _rank_plan(c: Candidates, leaves: list[int], ranks: dict[int, int], strategy: str) -> Plan:
    """A plan from low-rank leaves (given ranks, codec 0) and dense leaves (rank absent)."""
    leaves_arr = np.array(sorted(leaves), dtype=np.int64)
    lowrank = np.array([n in ranks for n in leaves_arr], dtype=bool)
    choice = np.full(len(c.triplets.node), DROP, dtype=np.int64)
    starts = c.triplets.starts(c.tree.size)
    for node, rank in ranks.items():
        choice[starts[node]:starts[node] + rank] = 0
    return Plan(leaves_arr, np.where(lowrank, LOWRANK, DENSE), np.where(lowrank, DROP, 0),
                choice, np.full(len(c.rows.node), DROP, dtype=np.int64), strategy)


def svd_plan(c: Candidates, budget: float) -> Plan:
    """One truncated SVD of the whole matrix, in the source dtype, at the smallest rank that fits."""
    rank = _prefix_rank(c, 0, c.triplets.starts(c.tree.size), budget)
    return _rank_plan(c, [0], {0: rank}, "svd")


def paper_plan(c: Candidates, budget: float) -> Plan:
    """The seed's Algorithm 1 with the global bound ||W - H||_F <= tau * sqrt(n_blocks).

    Start from the whole matrix; give every block the threshold tau² = budget / n_blocks; a block
    whose low-rank approximation within tau saves no space is subdivided (or stored dense if it
    cannot be); repeat with the new block count until nothing changes.
    """
    tree, starts = c.tree, c.triplets.starts(c.tree.size)
    children: dict[int, list[int]] = {}
    for node in range(1, tree.size):
        children.setdefault(int(tree.parent[node]), []).append(node)
    leaves = [0]
    while True:
        tau2 = budget / len(leaves)
        new_leaves, ranks, changed = [], {}, False
        for node in leaves:
            rank = _prefix_rank(c, node, starts, tau2)
            lowrank_bytes = rank * c.triplets.nbytes[0, starts[node]] if rank else 0.0
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
