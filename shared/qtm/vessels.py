"""A synthetic arterial tree for a tissue block: branching, Poiseuille/Murray flows, bolus transit.

A random-branching proxy for constrained constructive optimisation (science.md 3.5): terminals are
added in order of distance from the inlet, each joined to the nearest node already in the tree, so the
tree grows outward from the inlet with bifurcations where paths share a parent. Every terminal feeds
the capillary bed with a prescribed flow; segment flows are the sums of their downstream terminals
(mass conservation of plasma); radii follow Murray's law (r^3 proportional to Q) so the mean velocity
in a segment scales as Q^(1/3); a terminal's transit time is the sum of length/velocity along its path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class VascularTree:
    """Nodes (mm), parent index (-1 for the inlet), per-node flow from its parent (mm^3/s)."""

    points: np.ndarray  # [N, 3] node positions in mm (voxel centres * spacing)
    parent: np.ndarray  # [N] parent index, -1 for the inlet
    flow: np.ndarray  # [N] plasma flow through the segment parent -> node (mm^3/s)
    radius: np.ndarray  # [N] segment radius (mm)
    transit: np.ndarray  # [N] bolus transit time inlet -> node (s)
    terminal_of: np.ndarray  # [N] index into the terminal list, -1 for inner nodes

    @property
    def num_segments(self) -> int:
        return int((self.parent >= 0).sum())


def grow_tree(inlet_mm: np.ndarray, terminals_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points, parents and terminal index of a nearest-node tree rooted at ``inlet_mm``."""
    order = np.argsort(np.linalg.norm(terminals_mm - inlet_mm, axis=1))
    n = len(terminals_mm) + 1
    points = np.empty((n, 3))
    parent = np.full(n, -1, dtype=np.int64)
    terminal_of = np.full(n, -1, dtype=np.int64)
    points[0] = inlet_mm
    for k, t in enumerate(order, start=1):
        d = np.linalg.norm(points[:k] - terminals_mm[t], axis=1)
        parent[k] = int(np.argmin(d))
        points[k] = terminals_mm[t]
        terminal_of[k] = t
    return points, parent, terminal_of


def tree_flows(
    points: np.ndarray,
    parent: np.ndarray,
    terminal_of: np.ndarray,
    terminal_flow: np.ndarray,
    inlet_radius_mm: float = 0.6,
    inlet_velocity_mm_s: float = 120.0,
) -> VascularTree:
    """Segment flows (sum of downstream terminal flows), Murray radii, velocities and transit times."""
    n = len(points)
    flow = np.zeros(n)
    own = np.where(terminal_of >= 0, terminal_flow[np.maximum(terminal_of, 0)], 0.0)
    flow += own
    # nodes are added after their parents, so a reverse sweep accumulates subtree sums
    for k in range(n - 1, 0, -1):
        flow[parent[k]] += flow[k]
    q_in = max(flow[0], 1e-12)
    radius = inlet_radius_mm * np.cbrt(np.maximum(flow, 1e-12) / q_in)
    velocity = inlet_velocity_mm_s * np.cbrt(np.maximum(flow, 1e-12) / q_in)  # Q / (pi r^2) ~ Q^(1/3)
    transit = np.zeros(n)
    for k in range(1, n):
        length = float(np.linalg.norm(points[k] - points[parent[k]]))
        transit[k] = transit[parent[k]] + length / velocity[k]
    return VascularTree(points, parent, flow, radius, transit, terminal_of)


def rasterise_vessels(tree: VascularTree, shape: tuple[int, int, int], spacing: float,
                      max_fraction: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Large-vessel blood-volume fraction per voxel and the transit time of the blood in it.

    Each segment is sampled every spacing/3; a voxel receives pi r^2 * (sample length) / V, capped at
    ``max_fraction``; its transit time is the flow-weighted mean of the segment ends it holds.
    """
    vol = spacing**3
    frac = np.zeros(shape)
    t_weight = np.zeros(shape)
    for k in np.nonzero(tree.parent >= 0)[0]:
        a, b = tree.points[tree.parent[k]], tree.points[k]
        length = float(np.linalg.norm(b - a))
        steps = max(int(np.ceil(length / (spacing / 3))), 1)
        s = (np.arange(steps) + 0.5) / steps
        pts = a + (b - a) * s[:, None]
        idx = np.clip(np.floor(pts / spacing).astype(int), 0, np.array(shape) - 1)
        share = np.pi * tree.radius[k] ** 2 * (length / steps) / vol
        t_here = tree.transit[tree.parent[k]] + (tree.transit[k] - tree.transit[tree.parent[k]]) * s
        np.add.at(frac, tuple(idx.T), share)
        np.add.at(t_weight, tuple(idx.T), share * t_here)
    transit = np.where(frac > 0, t_weight / np.maximum(frac, 1e-30), 0.0)
    return np.minimum(frac, max_fraction), transit
