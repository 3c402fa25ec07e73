//! Filter planning for the HNSW backends. A graph search under a filter that keeps whole
//! clusters loses recall (QDRANT_EDGE.md, pitfall 6), and trained item embeddings cluster by
//! category, so the plan is chosen from the filter's estimated cardinality:
//! - small filtered sets are scanned exactly (cheap, and recall 1.0);
//! - a filter that selects several categories fans out, one search per category, merged;
//! - otherwise the graph is searched with `ef` raised as the filter narrows.

/// Tuning of the planner; the defaults come from the 1M-point measurements in
/// BENCHMARKS.md.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanConfig {
    /// `ef` of an unfiltered graph search (raised to 1.5 × k when k is larger).
    pub ef: usize,
    /// Upper bound on `ef` when a filter raises it.
    pub ef_max: usize,
    /// Filtered sets estimated at or below this many points are scanned exactly.
    pub exact_max_points: usize,
    /// At most this many categories fan out; more fall back to one graph search.
    pub fanout_max: usize,
    /// A filter keeping at least this fraction of the points needs no special treatment.
    /// (At 0.5, a filter excluding half the categories missed 3.2-3.8 % of the exact top 10
    /// in `edge_recall_against_exact`, over its 3 % budget; below 0.9 the beam is widened.)
    pub broad_fraction: f64,
    /// A filter with attribute conditions that keeps at most this many points is searched
    /// exactly, by the engine's payload index: an attribute can select whole clusters (a
    /// brand that makes one kind of product), where a filtered graph search loses recall
    /// and the category blocks cannot help. About 7 ms for 100k of 1M points (BENCHMARKS.md).
    pub attr_exact_max_points: usize,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            ef: 256,
            ef_max: 2_048,
            exact_max_points: 20_000,
            fanout_max: 16,
            broad_fraction: 0.9,
            attr_exact_max_points: 200_000,
        }
    }
}

/// How one search runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Graph (HNSW) search with this `ef`.
    Graph { ef: usize },
    /// Exact scan of the filtered set.
    Exact,
    /// One search per included category, each planned on its own, then merged.
    PerCategory,
}

impl PlanConfig {
    /// `ef` for an unfiltered search returning `k`.
    pub fn base_ef(&self, k: usize) -> usize {
        self.ef.max(k + k / 2)
    }

    /// Chooses a plan. `estimate` is the estimated number of points passing the filter
    /// (`None` when the filter restricts nothing that an index can count, e.g. only an
    /// exclusion list); `categories` is how many categories the filter includes.
    pub fn plan(&self, total: usize, estimate: Option<usize>, categories: usize, k: usize) -> Plan {
        let base = self.base_ef(k);
        let Some(estimate) = estimate else {
            return Plan::Graph { ef: base };
        };
        if estimate <= self.exact_max_points || total == 0 {
            return Plan::Exact;
        }
        let fraction = estimate as f64 / total as f64;
        if fraction >= self.broad_fraction {
            return Plan::Graph { ef: base };
        }
        if (2..=self.fanout_max).contains(&categories) {
            return Plan::PerCategory;
        }
        // Narrower filters leave fewer matching neighbours per graph hop; widen the beam by
        // 1/sqrt(fraction), which keeps latency bounded where 1/fraction would not.
        let ef = (base as f64 / fraction.sqrt()).ceil() as usize;
        Plan::Graph {
            ef: ef.min(self.ef_max).max(base),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_by_cardinality() {
        let c = PlanConfig::default();
        assert_eq!(c.plan(1_000_000, None, 0, 100), Plan::Graph { ef: 256 });
        assert_eq!(c.plan(1_000_000, None, 0, 400), Plan::Graph { ef: 600 });
        assert_eq!(c.plan(1_000_000, Some(10_000), 1, 100), Plan::Exact);
        assert_eq!(
            c.plan(1_000_000, Some(900_000), 3, 100),
            Plan::Graph { ef: 256 }
        );
        assert_eq!(c.plan(1_000_000, Some(100_000), 10, 100), Plan::PerCategory);
        let Plan::Graph { ef } = c.plan(1_000_000, Some(100_000), 1, 100) else {
            panic!("expected a graph plan")
        };
        assert!(ef > 256 && ef <= c.ef_max, "{ef}");
    }
}
