//! The re-ranker: one pure function of (context, candidates) -> ranked list.
//!
//! Each candidate's relevance is a weighted blend of
//! - the ANN similarity between the user vector and the item,
//! - the max and the mean cosine similarity to the session's recent items,
//! - the session's (recency-weighted) affinity for the item's categories,
//! - trending and freshness,
//!
//! minus a penalty for items the user viewed or clicked recently, plus the parts of the boost
//! rules in force (`[boosts]`: new arrivals, promoted items up to a cap, low stock buried).
//! Purchased items are dropped.
//! An MMR pass then orders the head of the list, trading relevance against similarity to what
//! was already picked, so one cluster cannot fill the whole page. Business rules (filters,
//! availability) are not here: the pipeline applies them after, against the live catalog.

use crate::config::{BoostRule, RerankWeights};
use crate::domain::{AttrValue, CatalogEntry, EventType, IdMap, IdSet, Item};
use crate::vector::Vector;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Recency half-life, in positions, of the category affinity (the model pools with the same).
const AFFINITY_HALF_LIFE: f32 = 5.0;

/// The share of the placed items one category may hold before MMR's category term applies.
const FREE_CATEGORY_SHARE: f32 = 0.5;

/// One thing the user did recently, newest first in [`Context::session`].
#[derive(Debug, Clone)]
pub struct SessionItem {
    pub entry: Arc<CatalogEntry>,
    pub event_type: EventType,
}

/// Everything the re-ranker knows about the request besides the candidates.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub weights: &'a RerankWeights,
    /// The user's and session's recent items, newest first.
    pub session: &'a [SessionItem],
    /// Never returned.
    pub purchased: &'a IdSet,
    /// Returned, but pushed down by `viewed_penalty`.
    pub viewed: &'a IdSet,
    /// Trending scores normalised to 0..=1; absent items count 0.
    pub trending: &'a IdMap<f32>,
    /// Unix seconds, for freshness.
    pub now_s: i64,
    /// How many leading positions the MMR pass orders; the tail keeps relevance order.
    pub mmr_depth: usize,
    /// The boost rules in force, by name (the variant's and the request's).
    pub boosts: &'a [(String, BoostRule)],
}

/// A candidate from the index (or a fallback source) with its ANN similarity.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub entry: Arc<CatalogEntry>,
    pub ann_score: f32,
}

/// The unweighted components of a score, returned with `explain=true`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Components {
    pub ann: f32,
    pub session_max: f32,
    pub session_mean: f32,
    pub category_affinity: f32,
    pub trending: f32,
    pub freshness: f32,
    /// 1 if the user viewed or clicked the item recently, else 0.
    pub viewed: f32,
    /// What each boost rule that applied added to the relevance (negative: buried), by
    /// rule name; a `promoted` item past the rule's cap is not boosted and not listed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub boosts: BTreeMap<String, f32>,
    /// The blended relevance (the weighted sum of the above, plus the boosts).
    pub relevance: f32,
    /// Max similarity to the items ranked above it, when the MMR pass placed it.
    pub redundancy: f32,
}

#[derive(Debug, Clone)]
pub struct Ranked {
    pub entry: Arc<CatalogEntry>,
    /// The blended relevance; the order may differ from it where MMR chose diversity.
    pub score: f32,
    pub components: Components,
}

/// Scores, drops purchased items, and orders the candidates (MMR on the head).
pub fn rerank(ctx: &Context<'_>, candidates: Vec<Candidate>) -> Vec<Ranked> {
    let w = ctx.weights;
    // Older items say little about what the user wants now, and each one costs a dot
    // product per candidate.
    let window = &ctx.session[..ctx.session.len().min(w.session_window)];
    let affinity = category_affinity(window);
    let dim = candidates.first().map_or(0, |c| c.entry.vector.len());
    let window_rows = Rows::new(window.iter().map(|s| &s.entry.vector), dim);
    let mut sims = Vec::with_capacity(window.len());
    // Which candidates to score: not purchased, and each id once (the first). The ids are
    // borrowed, not copied: this runs for every candidate of every request.
    let keep: Vec<bool> = {
        let mut seen: HashSet<&str, foldhash::fast::RandomState> =
            HashSet::with_capacity_and_hasher(candidates.len(), Default::default());
        candidates
            .iter()
            .map(|c| !ctx.purchased.contains(c.entry.id()) && seen.insert(c.entry.id().as_str()))
            .collect()
    };
    let kept: Vec<Candidate> = candidates
        .into_iter()
        .zip(keep)
        .filter_map(|(c, keep)| keep.then_some(c))
        .collect();
    // Every candidate's vector as f32, widened once from half precision: the window's
    // similarities and the MMR pass both read them.
    let rows = Rows::new(kept.iter().map(|c| &c.entry.vector), dim);
    let mut scored: Vec<Ranked> = kept
        .into_iter()
        .enumerate()
        .map(|(row, c)| {
            let mut comp = Components {
                ann: c.ann_score,
                ..Components::default()
            };
            if !window.is_empty() {
                window_rows.similarities(rows.row(row), &mut sims);
                let (mut max, mut sum) = (f32::MIN, 0.0);
                for &sim in &sims {
                    max = max.max(sim);
                    sum += sim;
                }
                comp.session_max = max;
                comp.session_mean = sum / window.len() as f32;
                comp.category_affinity = c
                    .entry
                    .item
                    .categories
                    .iter()
                    .filter_map(|g| affinity.iter().find(|(c, _)| *c == g.as_str()))
                    .map(|(_, a)| a)
                    .fold(0.0, |a: f32, &b| a.max(b));
            }
            comp.trending = ctx.trending.get(c.entry.id()).copied().unwrap_or(0.0);
            comp.freshness = freshness(c.entry.item.created_at, ctx.now_s, w);
            comp.viewed = if ctx.viewed.contains(c.entry.id()) {
                1.0
            } else {
                0.0
            };
            comp.relevance = w.ann * comp.ann
                + w.session_max * comp.session_max
                + w.session_mean * comp.session_mean
                + w.category_affinity * comp.category_affinity
                + w.trending * comp.trending
                + w.freshness * comp.freshness
                - w.viewed_penalty * comp.viewed;
            for (name, rule) in ctx.boosts {
                if let Some(part) = uncapped_boost(rule, &c.entry.item, ctx.now_s) {
                    comp.boosts.insert(name.clone(), part);
                    comp.relevance += part;
                }
            }
            Ranked {
                score: comp.relevance,
                entry: c.entry,
                components: comp,
            }
        })
        .collect();
    apply_capped_boosts(ctx.boosts, &mut scored);
    // Relevance order; `row_of[i]` is the row of the `i`-th.
    let mut row_of: Vec<usize> = (0..scored.len()).collect();
    row_of.sort_by(|&a, &b| {
        let (a, b) = (&scored[a], &scored[b]);
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.entry.id().cmp(b.entry.id()))
    });
    let mut slots: Vec<Option<Ranked>> = scored.into_iter().map(Some).collect();
    let scored: Vec<Ranked> = row_of
        .iter()
        .map(|&i| slots[i].take().expect("each row once"))
        .collect();
    // The category term counters what a session does to a page (its category pulls the ANN,
    // session and affinity parts at once); without a session (strangers, similar items,
    // where sameness is the point) it stays off.
    let category_repeat = if window.is_empty() {
        0.0
    } else {
        w.category_repeat
    };
    mmr(
        scored,
        &rows,
        &row_of,
        w.mmr_lambda,
        category_repeat,
        ctx.mmr_depth,
    )
}

/// A rule's part for one item, for the rules without a cap; `None` when it does not apply.
fn uncapped_boost(rule: &BoostRule, item: &Item, now_s: i64) -> Option<f32> {
    match rule {
        BoostRule::NewArrivals { weight, days } => {
            let age_days = (now_s - item.created_at?) as f32 / 86_400.0;
            (age_days < *days).then_some(*weight)
        }
        BoostRule::BuryLowStock {
            weight,
            below,
            attribute,
        } => {
            let stock = item.attributes.get(attribute)?.number()?;
            (stock < *below).then_some(-weight)
        }
        BoostRule::Promoted { .. } => None,
    }
}

/// Whether an item is promoted: its attribute is `true` (or the string "true").
fn is_promoted(item: &Item, attribute: &str) -> bool {
    match item.attributes.get(attribute) {
        Some(AttrValue::Bool(b)) => *b,
        Some(v) => v.has_any_of(&["true".to_string()]),
        None => false,
    }
}

/// The capped rules (`promoted`): the `cap` best-scored promoted candidates get the weight,
/// so that promotion lifts a few items without filling the page with them.
fn apply_capped_boosts(rules: &[(String, BoostRule)], scored: &mut [Ranked]) {
    for (name, rule) in rules {
        let BoostRule::Promoted {
            weight,
            cap,
            attribute,
        } = rule
        else {
            continue;
        };
        let mut promoted: Vec<usize> = (0..scored.len())
            .filter(|&i| is_promoted(&scored[i].entry.item, attribute))
            .collect();
        promoted.sort_by(|&a, &b| {
            scored[b]
                .score
                .total_cmp(&scored[a].score)
                .then_with(|| scored[a].entry.id().cmp(scored[b].entry.id()))
        });
        for &i in promoted.iter().take(*cap) {
            let r = &mut scored[i];
            r.components.boosts.insert(name.clone(), *weight);
            r.components.relevance += weight;
            r.score += weight;
        }
    }
}

/// Greedy MMR over the first `depth` positions: each step picks the candidate maximising
/// `lambda * relevance - (1 - lambda) * max similarity to the already picked -
/// category_repeat * excess`, where `excess` is how far the largest share of the already
/// picked in one of its categories is past [`FREE_CATEGORY_SHARE`], scaled to 0..=1.
/// The input is sorted by relevance, which also settles ties.
///
/// The similarity term alone cannot keep a page diverse after a click: the clicked
/// category's items are far more relevant than the rest (the ANN, session and affinity parts
/// all favour them), and not similar enough to each other for the penalty to catch up, so
/// they took all 20 places on the demo (BENCHMARKS.md, "Diversity after one click"). The
/// category term grows with the category's share of the page, so the page settles where
/// the clicked category holds about as much as its lead in relevance is worth.
///
/// `rows` holds the pool's vectors, one matrix so that each step scores all of them in one
/// pass; `pool[i]`'s is row `row_of[i]`.
fn mmr(
    mut pool: Vec<Ranked>,
    rows: &Rows,
    row_of: &[usize],
    lambda: f32,
    category_repeat: f32,
    depth: usize,
) -> Vec<Ranked> {
    if (lambda >= 1.0 && category_repeat <= 0.0) || depth == 0 || pool.len() < 2 {
        return pool;
    }
    let depth = depth.min(pool.len());
    let mut sims = Vec::with_capacity(pool.len());
    // Picks are marked, not removed, so that no step shifts the pool.
    let mut taken = vec![false; pool.len()];
    let mut order = Vec::with_capacity(depth);
    // Max similarity of each pooled candidate to everything picked so far, kept up to date
    // incrementally so each step costs one dot product per remaining candidate.
    let mut redundancy = vec![f32::MIN; pool.len()];
    // Each pooled candidate's categories as small numbers, named once here, so that the
    // steps below count and compare integers (every step visits every candidate) rather
    // than strings.
    let (category_ids, offsets) = category_ids(&pool);
    let categories_of = |i: usize| &category_ids[offsets[i]..offsets[i + 1]];
    // How many of the picked items are in each category.
    let mut picked_in = vec![0usize; category_ids.iter().max().map_or(0, |&m| m as usize + 1)];
    for step in 0..depth {
        let mut best: Option<usize> = None;
        let mut best_val = f32::MIN;
        for (i, r) in pool.iter().enumerate() {
            if taken[i] {
                continue;
            }
            let red = if step == 0 { 0.0 } else { redundancy[i] };
            let repeat = if step == 0 || category_repeat <= 0.0 {
                0.0
            } else {
                let most = categories_of(i)
                    .iter()
                    .map(|&c| picked_in[c as usize])
                    .max()
                    .unwrap_or(0);
                // Only a share past half the page costs: a user who chose three
                // categories gets them, one click does not get the whole page.
                let share = most as f32 / step as f32;
                ((share - FREE_CATEGORY_SHARE) / (1.0 - FREE_CATEGORY_SHARE)).max(0.0)
            };
            let val = lambda * r.score - (1.0 - lambda) * red - category_repeat * repeat;
            if best.is_none() || val > best_val {
                best_val = val;
                best = Some(i);
            }
        }
        let Some(best) = best else { break };
        taken[best] = true;
        order.push(best);
        for &c in categories_of(best) {
            picked_in[c as usize] += 1;
        }
        pool[best].components.redundancy = if step == 0 { 0.0 } else { redundancy[best] };
        rows.similarities(rows.row(row_of[best]), &mut sims);
        for (i, red) in redundancy.iter_mut().enumerate() {
            if !taken[i] {
                *red = red.max(sims[row_of[i]]);
            }
        }
    }
    let mut slots: Vec<Option<Ranked>> = pool.into_iter().map(Some).collect();
    let mut out: Vec<Ranked> = order.iter().filter_map(|&i| slots[i].take()).collect();
    out.extend(slots.into_iter().flatten());
    out
}

/// The pool's categories numbered in order of first appearance: all candidates' category
/// numbers in one list, and where each candidate's start (candidate `i` has
/// `ids[offsets[i]..offsets[i + 1]]`). An item lists a category at most once.
fn category_ids(pool: &[Ranked]) -> (Vec<u32>, Vec<usize>) {
    let mut names: Vec<&str> = Vec::new();
    let mut ids = Vec::with_capacity(pool.len());
    let mut offsets = Vec::with_capacity(pool.len() + 1);
    offsets.push(0);
    for r in pool {
        let start = ids.len();
        for g in &r.entry.item.categories {
            let id = match names.iter().position(|n| *n == g.as_str()) {
                Some(id) => id,
                None => {
                    names.push(g);
                    names.len() - 1
                }
            } as u32;
            if !ids[start..].contains(&id) {
                ids.push(id);
            }
        }
        offsets.push(ids.len());
    }
    (ids, offsets)
}

/// Vectors as the rows of one matrix, so that the similarities of one vector to all of them
/// are one pass ([`crate::vector::dot_rows`]) rather than a call per pair.
struct Rows {
    data: Vec<f32>,
    dim: usize,
    n: usize,
}

impl Rows {
    /// A vector of another length than `dim` (a model swap in progress) becomes a row of
    /// zeros: unrelated to everything, as [`Vector::similarity`] has it.
    fn new<'a>(vectors: impl ExactSizeIterator<Item = &'a Vector>, dim: usize) -> Rows {
        let mut data = Vec::with_capacity(vectors.len() * dim);
        let mut n = 0;
        for v in vectors {
            if v.len() == dim {
                v.extend_to(&mut data);
            } else {
                data.extend(std::iter::repeat_n(0.0, dim));
            }
            n += 1;
        }
        Rows { data, dim, n }
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The cosine similarity of `v` to each row, into `out`; all 0 when `v` has another
    /// length.
    fn similarities(&self, v: &[f32], out: &mut Vec<f32>) {
        if v.len() != self.dim || self.dim == 0 {
            out.clear();
            out.resize(self.n, 0.0);
            return;
        }
        crate::vector::dot_rows(v, &self.data, out);
    }
}

/// Recency-weighted share of the session in each category (0..=1). A list, not a map: a
/// session window touches a handful of categories, and every candidate looks its own up.
fn category_affinity(window: &[SessionItem]) -> Vec<(&str, f32)> {
    let mut weights: Vec<(&str, f32)> = Vec::new();
    let mut total = 0.0;
    for (pos, s) in window.iter().enumerate() {
        let w = 0.5f32.powf(pos as f32 / AFFINITY_HALF_LIFE);
        total += w;
        for g in &s.entry.item.categories {
            match weights.iter_mut().find(|(c, _)| *c == g.as_str()) {
                Some((_, sum)) => *sum += w,
                None => weights.push((g.as_str(), w)),
            }
        }
    }
    if total > 0.0 {
        weights.iter_mut().for_each(|(_, v)| *v /= total);
    }
    weights
}

fn freshness(created_at: Option<i64>, now_s: i64, w: &RerankWeights) -> f32 {
    let Some(created) = created_at else {
        return 0.0;
    };
    let age_days = (now_s - created).max(0) as f32 / 86_400.0;
    let f = (-age_days / w.freshness_half_life_days * std::f32::consts::LN_2).exp();
    // Past about 20 half-lives the value says nothing; `1.57e-14` in an explanation reads
    // as noise, so it is 0.
    if f < FRESHNESS_FLOOR {
        0.0
    } else {
        f
    }
}

/// Freshness below this is 0.
const FRESHNESS_FLOOR: f32 = 1e-6;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Item, ItemId};
    use std::collections::HashSet;

    fn entry(id: &str, genre: &str, vector: [f32; 2]) -> Arc<CatalogEntry> {
        let mut item = Item::new(ItemId::parse(id).unwrap(), id);
        item.categories = [genre.into()].into();
        let n = (vector[0] * vector[0] + vector[1] * vector[1]).sqrt();
        Arc::new(CatalogEntry {
            item,
            popularity: 0.0,
            vector: vec![vector[0] / n, vector[1] / n].into(),
        })
    }

    fn cand(e: &Arc<CatalogEntry>, ann: f32) -> Candidate {
        Candidate {
            entry: e.clone(),
            ann_score: ann,
        }
    }

    struct Fixture {
        weights: RerankWeights,
        session: Vec<SessionItem>,
        purchased: IdSet,
        viewed: IdSet,
        trending: IdMap<f32>,
        boosts: Vec<(String, BoostRule)>,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                weights: RerankWeights {
                    mmr_lambda: 1.0,
                    ..RerankWeights::default()
                },
                session: vec![],
                purchased: IdSet::default(),
                viewed: IdSet::default(),
                trending: IdMap::default(),
                boosts: Vec::new(),
            }
        }
        fn ctx(&self) -> Context<'_> {
            Context {
                weights: &self.weights,
                session: &self.session,
                purchased: &self.purchased,
                viewed: &self.viewed,
                trending: &self.trending,
                now_s: 1_000_000_000,
                mmr_depth: 10,
                boosts: &self.boosts,
            }
        }
    }

    fn ids(r: &[Ranked]) -> Vec<&str> {
        r.iter().map(|r| r.entry.id().as_str()).collect()
    }

    #[test]
    fn without_context_ann_order_is_kept() {
        let f = Fixture::new();
        let (a, b, c) = (
            entry("a", "x", [1.0, 0.0]),
            entry("b", "x", [1.0, 0.1]),
            entry("c", "y", [0.0, 1.0]),
        );
        let out = rerank(&f.ctx(), vec![cand(&b, 0.5), cand(&a, 0.9), cand(&c, 0.1)]);
        assert_eq!(ids(&out), ["a", "b", "c"]);
        assert_eq!(out[0].components.ann, 0.9);
        assert_eq!(out[0].components.session_max, 0.0);
    }

    #[test]
    fn purchased_items_never_come_back_and_duplicates_collapse() {
        let mut f = Fixture::new();
        let (a, b) = (entry("a", "x", [1.0, 0.0]), entry("b", "x", [1.0, 0.1]));
        f.purchased.insert(a.id().clone());
        let out = rerank(&f.ctx(), vec![cand(&a, 0.9), cand(&b, 0.5), cand(&b, 0.5)]);
        assert_eq!(ids(&out), ["b"]);
    }

    #[test]
    fn session_similarity_and_affinity_pull_toward_the_clicked_category() {
        let mut f = Fixture::new();
        let clicked = entry("s", "comedy", [0.0, 1.0]);
        f.session = vec![SessionItem {
            entry: clicked,
            event_type: EventType::Click,
        }];
        let drama = entry("d", "drama", [1.0, 0.0]);
        let comedy = entry("c", "comedy", [0.1, 1.0]);
        // The ANN alone prefers the drama by a little.
        let out = rerank(&f.ctx(), vec![cand(&drama, 0.6), cand(&comedy, 0.5)]);
        assert_eq!(ids(&out), ["c", "d"]);
        let c = out[0].components.clone();
        assert!(c.session_max > 0.99 && c.category_affinity == 1.0, "{c:?}");
        assert_eq!(out[1].components.category_affinity, 0.0);
    }

    #[test]
    fn viewed_items_are_pushed_down_not_removed() {
        let mut f = Fixture::new();
        let (a, b) = (entry("a", "x", [1.0, 0.0]), entry("b", "y", [0.0, 1.0]));
        f.viewed.insert(a.id().clone());
        let out = rerank(&f.ctx(), vec![cand(&a, 0.8), cand(&b, 0.7)]);
        assert_eq!(ids(&out), ["b", "a"]);
        assert_eq!(out[1].components.viewed, 1.0);
    }

    #[test]
    fn trending_and_freshness_break_near_ties() {
        let mut f = Fixture::new();
        let (a, b) = (entry("a", "x", [1.0, 0.0]), entry("b", "y", [0.0, 1.0]));
        f.trending.insert(b.id().clone(), 1.0);
        let out = rerank(&f.ctx(), vec![cand(&a, 0.55), cand(&b, 0.5)]);
        assert_eq!(ids(&out), ["b", "a"]);

        let f = Fixture::new();
        let mut fresh = CatalogEntry::clone(&b);
        fresh.item.created_at = Some(f.ctx().now_s - 86_400);
        let fresh = Arc::new(fresh);
        let mut old = CatalogEntry::clone(&a);
        old.item.created_at = Some(f.ctx().now_s - 86_400 * 3_650);
        let old = Arc::new(old);
        let out = rerank(&f.ctx(), vec![cand(&old, 0.52), cand(&fresh, 0.5)]);
        assert_eq!(ids(&out), ["b", "a"]);
        assert!(out[0].components.freshness > 0.9 && out[1].components.freshness < 0.01);
        // Ten years at a 30-day half-life is 2^-122: reported as 0, not 1e-37.
        assert_eq!(out[1].components.freshness, 0.0);
    }

    #[test]
    fn mmr_interleaves_a_dominant_cluster() {
        let mut f = Fixture::new();
        f.weights.mmr_lambda = 0.5;
        let x1 = entry("x1", "x", [1.0, 0.0]);
        let x2 = entry("x2", "x", [1.0, 0.01]);
        let x3 = entry("x3", "x", [1.0, 0.02]);
        let y1 = entry("y1", "y", [0.0, 1.0]);
        let cands = vec![
            cand(&x1, 0.9),
            cand(&x2, 0.89),
            cand(&x3, 0.88),
            cand(&y1, 0.7),
        ];
        let out = rerank(&f.ctx(), cands.clone());
        assert_eq!(ids(&out), ["x1", "y1", "x2", "x3"]);
        assert!(out[2].components.redundancy > 0.99);
        f.weights.mmr_lambda = 1.0;
        assert_eq!(ids(&rerank(&f.ctx(), cands)), ["x1", "x2", "x3", "y1"]);
    }

    /// After one click, the clicked category leads the blend through its session parts
    /// (similarity, affinity); the category term keeps it from taking every place, and is
    /// off without a session.
    #[test]
    fn a_clicked_category_leads_the_page_without_taking_it_over() {
        let mut f = Fixture::new();
        f.weights.mmr_lambda = RerankWeights::DEFAULT.mmr_lambda;
        // 8-d vectors: category i lies along axis i, its items tilted a little off it.
        let on_axis = |id: String, genre: &str, axis: usize, tilt: f32| {
            let mut item = Item::new(ItemId::parse(id).unwrap(), "t");
            item.categories = [genre.into()].into();
            let mut v = vec![0.0f32; 8];
            v[axis] = 1.0;
            v[7] = tilt;
            let n = (1.0 + tilt * tilt).sqrt();
            v.iter_mut().for_each(|x| *x /= n);
            Arc::new(CatalogEntry {
                item,
                popularity: 0.0,
                vector: v.into(),
            })
        };
        let clicked = on_axis("x-click".into(), "x", 0, 0.0);
        // 20 items of the clicked category near it, and 5 other categories of 20 items with
        // a better ANN score but nothing in common with the click.
        let mut cands = Vec::new();
        for n in 0..20 {
            let e = on_axis(format!("x{n}"), "x", 0, 0.2 + n as f32 * 0.01);
            cands.push(cand(&e, 0.6 - n as f32 * 0.001));
        }
        for (c, genre) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            for n in 0..20 {
                let e = on_axis(format!("{genre}{n}"), genre, c + 1, 0.2 + n as f32 * 0.01);
                cands.push(cand(&e, 0.9 - n as f32 * 0.001));
            }
        }
        let top = |f: &Fixture, repeat: f32| {
            let mut weights = f.weights.clone();
            weights.category_repeat = repeat;
            let ctx = Context {
                weights: &weights,
                mmr_depth: 25,
                ..f.ctx()
            };
            let out = rerank(&ctx, cands.clone());
            let top: Vec<String> = out[..20]
                .iter()
                .map(|r| r.entry.item.categories[0].to_string())
                .collect();
            let x = top.iter().filter(|g| *g == "x").count();
            let distinct = top.iter().collect::<HashSet<_>>().len();
            (top, x, distinct)
        };
        let default = RerankWeights::DEFAULT.category_repeat;
        // No session: the term is off.
        assert_eq!(top(&f, default).0, top(&f, 0.0).0);
        f.session = vec![SessionItem {
            entry: clicked,
            event_type: EventType::Click,
        }];
        let (_, x, _) = top(&f, 0.0);
        assert_eq!(
            x, 20,
            "without the term, the clicked category takes the page"
        );
        let (_, x, distinct) = top(&f, default);
        assert!(
            (10..20).contains(&x),
            "the clicked category leads: {x} of 20"
        );
        assert!(distinct >= 4, "{distinct} categories in the top 20");
    }

    #[test]
    fn mixed_dimensions_do_not_panic() {
        let f = Fixture::new();
        let a = entry("a", "x", [1.0, 0.0]);
        let mut odd = CatalogEntry::clone(&a);
        odd.item.item_id = ItemId::parse("odd").unwrap();
        odd.vector = vec![1.0, 0.0, 0.0].into();
        let out = rerank(&f.ctx(), vec![cand(&a, 0.5), cand(&Arc::new(odd), 0.4)]);
        assert_eq!(out.len(), 2);
        assert_eq!(Vector::from([1.0]).similarity(&[1.0, 2.0]), 0.0);
    }

    fn with_attr(id: &str, vector: [f32; 2], name: &str, v: AttrValue) -> Arc<CatalogEntry> {
        let mut e = Arc::unwrap_or_clone(entry(id, "x", vector));
        e.item.attributes.insert(name.into(), v);
        Arc::new(e)
    }

    #[test]
    fn promoted_items_rise_up_to_the_cap_and_explain_says_why() {
        let mut f = Fixture::new();
        f.boosts = vec![(
            "promoted".into(),
            BoostRule::Promoted {
                weight: 0.5,
                cap: 2,
                attribute: "promoted".into(),
            },
        )];
        let plain = entry("plain", "x", [1.0, 0.0]);
        let p: Vec<_> = (0..3)
            .map(|i| {
                with_attr(
                    &format!("p{i}"),
                    [1.0, 0.0],
                    "promoted",
                    AttrValue::Bool(true),
                )
            })
            .collect();
        let out = rerank(
            &f.ctx(),
            vec![
                cand(&plain, 0.9),
                cand(&p[0], 0.5),
                cand(&p[1], 0.45),
                cand(&p[2], 0.4),
            ],
        );
        // The two best promoted items pass the plain one; the third is past the cap.
        assert_eq!(ids(&out), ["p0", "p1", "plain", "p2"]);
        assert_eq!(out[0].components.boosts.get("promoted"), Some(&0.5));
        assert!((out[0].components.relevance - 1.0).abs() < 1e-6);
        assert!(out[3].components.boosts.is_empty());
    }

    #[test]
    fn new_arrivals_rise_and_low_stock_sinks() {
        let mut f = Fixture::new();
        f.boosts = vec![
            (
                "new_arrivals".into(),
                BoostRule::NewArrivals {
                    weight: 0.3,
                    days: 7.0,
                },
            ),
            (
                "bury_low_stock".into(),
                BoostRule::BuryLowStock {
                    weight: 0.3,
                    below: 5.0,
                    attribute: "stock".into(),
                },
            ),
        ];
        let mut fresh = Arc::unwrap_or_clone(entry("fresh", "x", [1.0, 0.0]));
        fresh.item.created_at = Some(1_000_000_000 - 86_400);
        let fresh = Arc::new(fresh);
        let old = entry("old", "x", [1.0, 0.0]);
        let scarce = with_attr("scarce", [1.0, 0.0], "stock", AttrValue::Number(2.0));
        let stocked = with_attr("stocked", [1.0, 0.0], "stock", AttrValue::Number(50.0));
        let out = rerank(
            &f.ctx(),
            vec![
                cand(&scarce, 0.9),
                cand(&old, 0.8),
                cand(&fresh, 0.6),
                cand(&stocked, 0.55),
            ],
        );
        assert_eq!(ids(&out), ["fresh", "old", "scarce", "stocked"]);
        assert_eq!(out[0].components.boosts.get("new_arrivals"), Some(&0.3));
        assert_eq!(out[2].components.boosts.get("bury_low_stock"), Some(&-0.3));
    }
}
