"""SYNTHETIC two-tower interactions with a planted structure (not real behaviour data).

Items belong to latent clusters with Zipf popularity; each user prefers a few clusters and its
history is drawn from them; a relevant candidate comes from a preferred cluster, an irrelevant
one from the others. Useful to check that a two-tower model learns.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from dist_share.data.types import SPLITS, Arrays, split_rng

if TYPE_CHECKING:
    from dist_share.config.schema import DataConfig


@functools.lru_cache(maxsize=2)
def _two_tower_world(split_seed, num_users, num_items, num_clusters, preferred, history, zipf):
    """The planted structure: item clusters, Zipf popularity, user preferences and histories."""
    rng = np.random.default_rng([split_seed, 4])
    item_cluster = rng.permutation(np.arange(num_items) % num_clusters)
    rank = np.empty(num_items)
    members = [np.flatnonzero(item_cluster == c) for c in range(num_clusters)]
    for m in members:
        rank[m] = rng.permutation(len(m)) + 1
    weight = rank**-zipf  # Zipf popularity inside each cluster
    prefs = np.stack([rng.choice(num_clusters, preferred, replace=False) for _ in range(num_users)])
    cluster_p = [weight[m] / weight[m].sum() for m in members]

    def draw(clusters: np.ndarray) -> np.ndarray:
        out = np.empty(clusters.shape, np.int64)
        for c in range(num_clusters):
            mask = clusters == c
            out[mask] = rng.choice(members[c], int(mask.sum()), p=cluster_p[c])
        return out

    hist_clusters = prefs[
        np.arange(num_users)[:, None], rng.integers(0, preferred, (num_users, history))
    ]
    return item_cluster, weight, members, cluster_p, prefs, draw(hist_clusters)


def two_tower_world(data: DataConfig) -> tuple:
    """The planted structure of ``data``'s synthetic world (cached per its settings): item
    clusters, popularity weights, cluster members and their draw probabilities, each user's
    preferred clusters, and each user's history."""
    s = data.synthetic
    return _two_tower_world(
        int(data.split_seed),
        s.num_users,
        s.num_items,
        s.num_clusters,
        s.preferred_clusters,
        s.history_length,
        float(s.zipf_exponent),
    )


def synthetic_interactions(data: DataConfig, split: str, n: int) -> Arrays:
    """``n`` two-tower examples of the synthetic world."""
    s = data.synthetic
    _, weight, members, cluster_p, prefs, histories = two_tower_world(data)
    rng = split_rng(data.split_seed, 5, SPLITS.index(split))
    users = rng.integers(0, s.num_users, n)
    relevant = rng.random(n) < s.positive_fraction
    # Relevant: a preferred cluster; irrelevant: any other cluster (uniformly chosen offset).
    pos_c = prefs[users, rng.integers(0, s.preferred_clusters, n)]
    others = np.array([np.setdiff1d(np.arange(s.num_clusters), p) for p in prefs])
    neg_c = others[users, rng.integers(0, others.shape[1], n)]
    clusters = np.where(relevant, pos_c, neg_c)
    items = np.empty(n, np.int64)
    for c in range(s.num_clusters):
        mask = clusters == c
        items[mask] = rng.choice(members[c], int(mask.sum()), p=cluster_p[c])
    feats = {
        "query_user": users.astype(np.int32),
        "query_history": histories[users].astype(np.int32),
        "candidate_item": items.astype(np.int32),
    }
    return feats, relevant.astype(np.float32)
