//! Offline evaluation: the protocol's metrics, computed exactly as `../shared/eval/score.py`
//! computes them (same per-user formulas, same user order, numpy's pairwise summation), so
//! `tandem eval` and `score.py` agree to the last bit, and top-N recommendation for every
//! test user of a split directory.
//!
//! A split directory holds `items.csv`, `train.csv`, `onboard.csv`, `test.csv`,
//! `onboard_test.csv` and `val/{train,test}.csv`. Test files only choose which users are
//! scored and provide the truth; histories come from `train.csv` + `onboard.csv`.

use crate::data::{read_interactions, read_items, DataError};
use crate::domain::{Interaction, Item, ItemId, UserId};
use crate::model::{ModelError, PopularityPrior, TwoTower, UserEvent};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The list length the protocol scores.
pub const MAX_K: usize = 20;
pub const KS: [usize; 2] = [10, 20];
/// A test item is cold when it has fewer than this many rows in the training file.
pub const COLD_ITEM_THRESHOLD: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("split file {path} is missing (a split directory holds items.csv, train.csv, onboard.csv, test.csv, onboard_test.csv and val/)")]
    MissingFile { path: PathBuf },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Which slice of a split to evaluate on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    /// Known = `train.csv` + `onboard.csv`; truth = `test.csv` and `onboard_test.csv`.
    Test,
    /// Known = `val/train.csv`; truth = `val/test.csv`; no new users. For tuning.
    Val,
}

/// A split directory, read for one slice.
#[derive(Debug, Clone)]
pub struct Split {
    pub dir: PathBuf,
    pub on: On,
    pub items: Vec<Item>,
    /// The training rows (`train.csv`, or `val/train.csv`), in file (time) order.
    pub train: Vec<Interaction>,
    /// `onboard.csv` (empty for `On::Val`).
    pub onboard: Vec<Interaction>,
    pub test: Vec<Interaction>,
    /// `onboard_test.csv` (empty for `On::Val`).
    pub onboard_test: Vec<Interaction>,
}

fn split_file(dir: &Path, rel: &str) -> Result<PathBuf, EvalError> {
    let p = dir.join(rel);
    if p.is_file() {
        Ok(p)
    } else {
        Err(EvalError::MissingFile { path: p })
    }
}

impl Split {
    pub fn load(dir: &Path, on: On) -> Result<Self, EvalError> {
        let rows = |rel: &str| -> Result<Vec<Interaction>, EvalError> {
            Ok(read_interactions(&split_file(dir, rel)?)?)
        };
        let items = read_items(&split_file(dir, "items.csv")?)?;
        let (train, onboard, test, onboard_test) = match on {
            On::Test => (
                rows("train.csv")?,
                rows("onboard.csv")?,
                rows("test.csv")?,
                rows("onboard_test.csv")?,
            ),
            On::Val => (
                rows("val/train.csv")?,
                Vec::new(),
                rows("val/test.csv")?,
                Vec::new(),
            ),
        };
        Ok(Split {
            dir: dir.to_path_buf(),
            on,
            items,
            train,
            onboard,
            test,
            onboard_test,
        })
    }

    /// Makes new users in a validation slice the way the protocol makes them in the test
    /// slice, so that tuning can see the cold-start case: about one user in `every` (chosen by
    /// a hash of the id and `seed`) with more than `onboard` rows is taken out of training.
    /// Their first `onboard` rows (by time) become `onboard`, and the rest of their rows, train
    /// and test alike, become `onboard_test`, the truth to predict.
    pub fn hold_out_new_users(&mut self, every: u64, onboard: usize, seed: u64) {
        let mut total: HashMap<&UserId, usize> = HashMap::new();
        for r in self.train.iter().chain(&self.test) {
            *total.entry(&r.user_id).or_default() += 1;
        }
        let chosen: HashSet<UserId> = total
            .into_iter()
            .filter(|(u, n)| {
                *n > onboard
                    && crate::model::features::hash(seed, "newuser", u.as_str())
                        .is_multiple_of(every)
            })
            .map(|(u, _)| u.clone())
            .collect();
        if chosen.is_empty() {
            return;
        }
        let (held, train): (Vec<Interaction>, Vec<Interaction>) = std::mem::take(&mut self.train)
            .into_iter()
            .partition(|r| chosen.contains(&r.user_id));
        let (held_test, test): (Vec<Interaction>, Vec<Interaction>) =
            std::mem::take(&mut self.test)
                .into_iter()
                .partition(|r| chosen.contains(&r.user_id));
        self.train = train;
        self.test = test;
        let mut by_user: HashMap<&UserId, Vec<&Interaction>> = HashMap::new();
        for r in &held {
            by_user.entry(&r.user_id).or_default().push(r);
        }
        let mut users: Vec<&UserId> = by_user.keys().copied().collect();
        users.sort();
        for u in users {
            let rows = by_user.get_mut(u).expect("present");
            rows.sort_by_key(|r| r.timestamp);
            for (i, r) in rows.iter().enumerate() {
                if i < onboard {
                    self.onboard.push((*r).clone());
                } else {
                    self.onboard_test.push((*r).clone());
                }
            }
        }
        self.onboard_test.extend(held_test);
    }

    /// The known rows: train then onboard, each in time order.
    pub fn known_rows(&self) -> impl Iterator<Item = &Interaction> {
        self.train.iter().chain(self.onboard.iter())
    }

    /// Users to recommend for: test users then new users, each sorted as `score.py` sorts.
    pub fn scored_users(&self) -> Vec<UserId> {
        let mut main = users_of(&self.test);
        main.extend(users_of(&self.onboard_test));
        main
    }
}

fn users_of(rows: &[Interaction]) -> Vec<UserId> {
    let set: HashSet<&UserId> = rows.iter().map(|r| &r.user_id).collect();
    let mut v: Vec<UserId> = set.into_iter().cloned().collect();
    sort_ids(&mut v);
    v
}

/// `score.py` orders users by integer id; non-numeric ids (other datasets) sort after, by text.
fn sort_ids(v: &mut [UserId]) {
    v.sort_by_cached_key(|u| (u.as_str().parse::<i128>().map_err(|_| ()), u.clone()));
}

/// Ground truth per user.
pub type Truth = BTreeMap<UserId, HashSet<ItemId>>;

fn truth_of(rows: &[Interaction]) -> Vec<(UserId, HashSet<ItemId>)> {
    let mut m: HashMap<UserId, HashSet<ItemId>> = HashMap::new();
    for r in rows {
        m.entry(r.user_id.clone())
            .or_default()
            .insert(r.item_id.clone());
    }
    let mut users: Vec<UserId> = m.keys().cloned().collect();
    sort_ids(&mut users);
    users
        .into_iter()
        .map(|u| {
            let t = m.remove(&u).expect("present");
            (u, t)
        })
        .collect()
}

/// numpy's pairwise float64 sum (blocks of up to 128 with 8 accumulators), so means match
/// `score.py` and the reference harness bit for bit.
pub fn np_sum(a: &[f64]) -> f64 {
    0.0 + pairwise(a)
}

fn pairwise(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += x;
        }
        return res;
    }
    if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let stop = n - n % 8;
        let mut i = 8;
        while i < stop {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        return res;
    }
    let mut n2 = n / 2;
    n2 -= n2 % 8;
    pairwise(&a[..n2]) + pairwise(&a[n2..])
}

fn np_mean(a: &[f64]) -> Option<f64> {
    (!a.is_empty()).then(|| np_sum(a) / a.len() as f64)
}

fn discount(p: usize) -> f64 {
    1.0 / ((p + 1) as f64).log2()
}

/// Every metric at every K for one user (`recs` best first, at most [`MAX_K`] used).
fn user_metrics(recs: &[ItemId], truth: &HashSet<ItemId>) -> BTreeMap<String, f64> {
    let hits: Vec<bool> = recs.iter().take(MAX_K).map(|i| truth.contains(i)).collect();
    let mut out = BTreeMap::new();
    for k in KS {
        let h = &hits[..hits.len().min(k)];
        let nh = h.iter().filter(|&&x| x).count();
        let denom = k.min(truth.len());
        out.insert(format!("recall@{k}"), nh as f64 / denom as f64);
        let gains: Vec<f64> = h
            .iter()
            .enumerate()
            .filter(|(_, &hit)| hit)
            .map(|(p, _)| discount(p + 1))
            .collect();
        let ideal: Vec<f64> = (1..=denom).map(discount).collect();
        out.insert(format!("ndcg@{k}"), np_sum(&gains) / np_sum(&ideal));
        out.insert(format!("hitrate@{k}"), if nh > 0 { 1.0 } else { 0.0 });
        let mrr = h
            .iter()
            .position(|&x| x)
            .map_or(0.0, |p| 1.0 / (p + 1) as f64);
        out.insert(format!("mrr@{k}"), mrr);
    }
    out
}

/// Metric name to the per-user values, users in `truth` order; users without recs score 0.
fn per_user(
    lists: &HashMap<UserId, Vec<ItemId>>,
    truth: &[(UserId, HashSet<ItemId>)],
) -> BTreeMap<String, Vec<f64>> {
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let empty = Vec::new();
    for (u, t) in truth {
        for (name, v) in user_metrics(lists.get(u).unwrap_or(&empty), t) {
            out.entry(name).or_default().push(v);
        }
    }
    out
}

/// The protocol's metrics for top-N lists, with `score.py`'s keys (`recall@20`,
/// `cold_recall@20`, `newuser_ndcg@10`, `coverage@10`, ...). Lists must be best first without
/// duplicates; only the first [`MAX_K`] items count.
pub fn score(lists: &HashMap<UserId, Vec<ItemId>>, split: &Split) -> BTreeMap<String, f64> {
    let mut metrics = BTreeMap::new();
    let test = truth_of(&split.test);
    for (name, v) in per_user(lists, &test) {
        if let Some(m) = np_mean(&v) {
            metrics.insert(name, m);
        }
    }
    let catalog: HashSet<&ItemId> = split.items.iter().map(|i| &i.item_id).collect();
    for k in KS {
        let mut rec: HashSet<&ItemId> = HashSet::new();
        for (u, _) in &test {
            if let Some(l) = lists.get(u) {
                rec.extend(l.iter().take(k));
            }
        }
        let covered = rec.iter().filter(|i| catalog.contains(*i)).count();
        metrics.insert(
            format!("coverage@{k}"),
            covered as f64 / catalog.len() as f64,
        );
    }
    let mut train_counts: HashMap<&ItemId, usize> = HashMap::new();
    for r in &split.train {
        *train_counts.entry(&r.item_id).or_default() += 1;
    }
    let cold: Vec<(UserId, HashSet<ItemId>)> = test
        .iter()
        .filter_map(|(u, t)| {
            let c: HashSet<ItemId> = t
                .iter()
                .filter(|i| train_counts.get(i).copied().unwrap_or(0) < COLD_ITEM_THRESHOLD)
                .cloned()
                .collect();
            (!c.is_empty()).then(|| (u.clone(), c))
        })
        .collect();
    if let Some(m) = per_user(lists, &cold)
        .get(&format!("recall@{MAX_K}"))
        .and_then(|v| np_mean(v))
    {
        metrics.insert(format!("cold_recall@{MAX_K}"), m);
    }
    for (name, v) in per_user(lists, &truth_of(&split.onboard_test)) {
        if let Some(m) = np_mean(&v) {
            metrics.insert(format!("newuser_{name}"), m);
        }
    }
    metrics
}

/// The top `k` catalog items for each user in `users`, best first, excluding the user's known
/// items. A user's history is their known rows, newest first. Items are ranked by the towers'
/// score plus the checkpoint's popularity prior.
pub fn recommend(
    model: &TwoTower,
    split: &Split,
    users: &[UserId],
    k: usize,
) -> Result<HashMap<UserId, Vec<ItemId>>, EvalError> {
    let prior = model.manifest().popularity_prior;
    Ok(Ranker::new(model, split, users)?.top_k(&prior, k))
}

/// Tower scores of every (user, catalog item) pair of a split, computed once, so that
/// popularity priors can be compared without re-running the towers.
pub struct Ranker<'a> {
    split: &'a Split,
    users: Vec<UserId>,
    /// `[users, items]` row-major.
    scores: Vec<f32>,
    /// Known items per user (excluded), and the history length the prior sees.
    known: Vec<HashSet<usize>>,
    history_len: Vec<usize>,
    /// Training counts of each user's newest `pooling.max_history` history items.
    history_counts: Vec<Vec<f32>>,
    /// Training count and the prior's value per catalog item.
    counts: Vec<f32>,
    popularity: Vec<f32>,
}

impl<'a> Ranker<'a> {
    pub fn new(model: &TwoTower, split: &'a Split, users: &[UserId]) -> Result<Self, EvalError> {
        let item_index: HashMap<&ItemId, usize> = split
            .items
            .iter()
            .enumerate()
            .map(|(i, it)| (&it.item_id, i))
            .collect();
        let mut histories: HashMap<&UserId, Vec<&Interaction>> = HashMap::new();
        for r in split.known_rows() {
            histories.entry(&r.user_id).or_default().push(r);
        }
        let item_vecs = model.embed_items(&split.items)?;
        let dim = model.dim();
        let flat: Vec<f32> = item_vecs.into_iter().flatten().collect();
        let items_t = Tensor::from_vec(flat, (split.items.len(), dim), &Device::Cpu)
            .map_err(ModelError::from)?;

        let mut user_flat = Vec::with_capacity(users.len() * dim);
        let mut known = Vec::with_capacity(users.len());
        let mut history_len = Vec::with_capacity(users.len());
        let mut history_counts = Vec::with_capacity(users.len());
        let max_history = model.manifest().pooling.max_history;
        for u in users {
            let rows = histories.get(u).map(Vec::as_slice).unwrap_or(&[]);
            let events: Vec<UserEvent<'_>> = rows
                .iter()
                .rev()
                .filter_map(|r| {
                    item_index.get(&r.item_id).map(|&i| UserEvent {
                        item: &split.items[i],
                        event_type: r.event_type,
                    })
                })
                .collect();
            user_flat.extend(model.embed_user(&events)?);
            history_len.push(events.len());
            history_counts.push(
                events
                    .iter()
                    .take(max_history)
                    .map(|e| model.popularity(e.item))
                    .collect(),
            );
            known.push(
                rows.iter()
                    .filter_map(|r| item_index.get(&r.item_id).copied())
                    .collect(),
            );
        }
        let users_t = Tensor::from_vec(user_flat, (users.len(), dim), &Device::Cpu)
            .map_err(ModelError::from)?;
        let scores: Vec<f32> = users_t
            .matmul(&items_t.t().map_err(ModelError::from)?)
            .and_then(|s| s.flatten_all()?.to_vec1())
            .map_err(ModelError::from)?;
        let counts: Vec<f32> = split.items.iter().map(|it| model.popularity(it)).collect();
        let popularity = counts.iter().map(|&c| model.prior_value(c)).collect();
        Ok(Ranker {
            split,
            users: users.to_vec(),
            scores,
            known,
            history_len,
            history_counts,
            counts,
            popularity,
        })
    }

    /// The top `k` per user under `prior` (users split over the thread pool).
    pub fn top_k(&self, prior: &PopularityPrior, k: usize) -> HashMap<UserId, Vec<ItemId>> {
        use rayon::prelude::*;
        let n_items = self.split.items.len();
        self.users
            .par_iter()
            .enumerate()
            .map_init(
                || vec![0f32; n_items],
                |row, (u, user)| {
                    let n = self.history_len[u];
                    let cold_share = prior.cold_share(self.history_counts[u].iter().copied());
                    let base = &self.scores[u * n_items..(u + 1) * n_items];
                    for (((r, &s), &c), &p) in row
                        .iter_mut()
                        .zip(base)
                        .zip(&self.counts)
                        .zip(&self.popularity)
                    {
                        *r = s + prior.user_term(n, cold_share, c, p);
                    }
                    let known = &self.known[u];
                    let list = top_k(row, k, |i| !known.contains(&i))
                        .into_iter()
                        .map(|i| self.split.items[i].item_id.clone())
                        .collect();
                    (user.clone(), list)
                },
            )
            .collect()
    }
}

/// Indices of the `k` highest scores among those `keep` accepts, best first; ties go to the
/// lower index so results are deterministic.
pub fn top_k(scores: &[f32], k: usize, keep: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    for (i, &s) in scores.iter().enumerate() {
        // The cheap threshold test first: `keep` (a hash lookup in evaluation) then runs for
        // the few items that would enter the list, not for the whole catalog.
        if s.is_nan() || (best.len() == k && s <= best[k - 1].0) || !keep(i) {
            continue;
        }
        let pos = best.partition_point(|&(b, _)| b >= s);
        best.insert(pos, (s, i));
        best.truncate(k);
    }
    best.into_iter().map(|(_, i)| i).collect()
}

/// Writes `user_id,item_id,rank` for `users` in order (rank 1 is the best).
pub fn write_recs(
    path: &Path,
    users: &[UserId],
    lists: &HashMap<UserId, Vec<ItemId>>,
) -> Result<(), EvalError> {
    let io = |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    writeln!(out, "user_id,item_id,rank").map_err(io)?;
    for u in users {
        for (r, i) in lists.get(u).into_iter().flatten().enumerate() {
            writeln!(out, "{u},{i},{}", r + 1).map_err(io)?;
        }
    }
    out.flush().map_err(io)
}

/// The metrics as a table, in the order `score.py` prints them.
pub fn format_metrics(m: &BTreeMap<String, f64>) -> String {
    let cols = [
        "recall@10",
        "recall@20",
        "ndcg@10",
        "ndcg@20",
        "hitrate@10",
        "hitrate@20",
        "mrr@10",
        "mrr@20",
    ];
    let fmt = |k: &str| m.get(k).map_or("  n/a ".to_string(), |v| format!("{v:.4}"));
    let mut s = format!(
        "{:<10} {}\n",
        "scenario",
        cols.iter()
            .map(|c| format!("{c:>10}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    s += &format!(
        "{:<10} {}\n",
        "main",
        cols.iter()
            .map(|c| format!("{:>10}", fmt(c)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if m.contains_key("newuser_recall@20") {
        s += &format!(
            "{:<10} {}\n",
            "new-user",
            cols.iter()
                .map(|c| format!("{:>10}", fmt(&format!("newuser_{c}"))))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    s += &format!(
        "coverage@10={} coverage@20={} cold_recall@20={}",
        fmt("coverage@10"),
        fmt("coverage@20"),
        fmt("cold_recall@20")
    );
    s
}

/// How `tandem eval --similar` samples its anchors.
#[derive(Debug, Clone, Copy)]
pub struct SimilarConfig {
    /// Neighbours per anchor (`similar@k`).
    pub k: usize,
    /// The most-interacted items, by training count.
    pub bestsellers: usize,
    /// A wider slice of the head (the top 100 of ml-latest-small).
    pub head: usize,
    /// Items drawn uniformly from the catalog.
    pub random: usize,
    /// Items given a content twin (same title, categories, tags, year, price; a new id).
    pub twins: usize,
    /// A twin counts as placed when it is among its original's `twin_k` nearest neighbours.
    pub twin_k: usize,
    pub seed: u64,
}

impl Default for SimilarConfig {
    fn default() -> Self {
        SimilarConfig {
            k: 10,
            bestsellers: 20,
            head: 100,
            random: 100,
            twins: 100,
            twin_k: 50,
            seed: 7,
        }
    }
}

/// Categories of an item as `similar` compares them (trimmed, lower-cased, no placeholder).
fn categories(item: &Item) -> HashSet<String> {
    item.categories
        .iter()
        .map(|g| g.trim().to_lowercase())
        .filter(|g| !g.is_empty() && g != "(no genres listed)")
        .collect()
}

/// Share of `neighbours` sharing at least one category with `anchor`.
fn same_category_share(
    cats: &[HashSet<String>],
    anchor: usize,
    neighbours: &[usize],
) -> Option<f64> {
    if neighbours.is_empty() || cats[anchor].is_empty() {
        return None;
    }
    let same = neighbours
        .iter()
        .filter(|&&j| !cats[anchor].is_disjoint(&cats[j]))
        .count();
    Some(same as f64 / neighbours.len() as f64)
}

/// A deterministic sample of `n` distinct indices below `len` (xorshift from `seed`).
fn sample_indices(len: usize, n: usize, seed: u64, keep: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..len).filter(|&i| keep(i)).collect();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let n = n.min(pool.len());
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = i + (x % (pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(n);
    pool
}

/// The item-to-item metrics of a model on a catalog and its training rows:
///
/// - `similar_same_category@k_{bestsellers,head,random}`: for anchors among the top
///   `bestsellers` / `head` items by training count and `random` uniform items, the share of
///   the `k` nearest neighbours by [`TwoTower::similar_query`] (exact search over the whole
///   catalog, the anchor excluded) that share at least one category with the anchor;
/// - `itemknn_same_category@k_*`: the same for the co-occurrence baseline (cosine on the
///   binary user-item matrix of `rows`);
/// - `twin_in_top{twin_k}`: the share of `twins` content twins (a new id with the original's
///   title, categories, tags, year and price, so a content-only vector) that are among their
///   original's `twin_k` nearest neighbours by the same query, and `..._by_item_vector` by
///   the original's plain item vector (the twin's reach in personal recommendations);
/// - `twin_rank_median`: the twin's median rank by the query (0 = nearest).
pub fn similar_metrics(
    model: &TwoTower,
    items: &[Item],
    rows: &[Interaction],
    cfg: &SimilarConfig,
) -> Result<BTreeMap<String, f64>, EvalError> {
    let index: HashMap<&ItemId, usize> = items
        .iter()
        .enumerate()
        .map(|(i, it)| (&it.item_id, i))
        .collect();
    let mut users: HashMap<&UserId, Vec<usize>> = HashMap::new();
    for r in rows {
        if let Some(&i) = index.get(&r.item_id) {
            users.entry(&r.user_id).or_default().push(i);
        }
    }
    let mut by_item: Vec<Vec<u32>> = vec![Vec::new(); items.len()];
    for (u, (_, list)) in users.iter_mut().enumerate() {
        list.sort_unstable();
        list.dedup();
        for &i in list.iter() {
            by_item[i].push(u as u32);
        }
    }
    let user_items: Vec<&Vec<usize>> = users.values().collect();
    let counts: Vec<usize> = by_item.iter().map(Vec::len).collect();
    let cats: Vec<HashSet<String>> = items.iter().map(categories).collect();

    let mut by_count: Vec<usize> = (0..items.len()).filter(|&i| counts[i] > 0).collect();
    by_count.sort_by_key(|&i| (std::cmp::Reverse(counts[i]), i));
    let with_cats = |i: usize| !cats[i].is_empty();
    let head_of = |n: usize| -> Vec<usize> {
        by_count
            .iter()
            .copied()
            .filter(|&i| with_cats(i))
            .take(n)
            .collect()
    };
    let anchors = [
        ("bestsellers", head_of(cfg.bestsellers)),
        ("head", head_of(cfg.head)),
        (
            "random",
            sample_indices(items.len(), cfg.random, cfg.seed, with_cats),
        ),
    ];

    let dim = model.dim();
    let vectors: Vec<f32> = model.embed_items(items)?.into_iter().flatten().collect();
    let score_all = |query: &[f32], out: &mut Vec<f32>| {
        out.clear();
        out.extend(vectors.chunks(dim).map(|v| dot(query, v)));
    };

    let mut m = BTreeMap::new();
    let k = cfg.k;
    let mut scores = Vec::with_capacity(items.len());
    for (name, list) in &anchors {
        let (mut model_share, mut knn_share) = (Vec::new(), Vec::new());
        for &a in list {
            let q = model.similar_query(&items[a])?;
            score_all(&q, &mut scores);
            let nn = top_k(&scores, k, |j| j != a);
            model_share.extend(same_category_share(&cats, a, &nn));
            // Item-kNN: co-occurrence counts with every item, cosine-normalized.
            let mut co = vec![0f32; items.len()];
            for &u in &by_item[a] {
                for &j in user_items[u as usize] {
                    co[j] += 1.0;
                }
            }
            for (j, c) in co.iter_mut().enumerate() {
                if *c > 0.0 {
                    *c /= ((counts[a] * counts[j]) as f32).sqrt();
                }
            }
            let nn = top_k(&co, k, |j| j != a && co[j] > 0.0);
            knn_share.extend(same_category_share(&cats, a, &nn));
        }
        if let Some(v) = np_mean(&model_share) {
            m.insert(format!("similar_same_category@{k}_{name}"), v);
        }
        if let Some(v) = np_mean(&knn_share) {
            m.insert(format!("itemknn_same_category@{k}_{name}"), v);
        }
        m.insert(format!("anchors_{name}"), list.len() as f64);
    }

    // Content twins of trained items: embedded with no id row, as a brand-new item is.
    let originals = sample_indices(items.len(), cfg.twins, cfg.seed ^ 0x7457, |i| counts[i] > 0);
    // Placed by the `similar` query, and by the original's item vector alone (what decides
    // whether the twin reaches the users who like the original).
    let mut ranks = Vec::with_capacity(originals.len());
    let mut placed = [0usize; 2];
    for &o in &originals {
        let mut twin = items[o].clone();
        twin.item_id = ItemId::parse(format!("twin-of-{}", items[o].item_id))
            .map_err(|e| EvalError::Invalid(e.to_string()))?;
        let tv = model.embed_items(std::slice::from_ref(&twin))?.remove(0);
        let queries = [
            model.similar_query(&items[o])?,
            vectors[o * dim..(o + 1) * dim].to_vec(),
        ];
        for (k, q) in queries.iter().enumerate() {
            score_all(q, &mut scores);
            let twin_score = dot(q, &tv);
            let rank = scores
                .iter()
                .enumerate()
                .filter(|&(j, &s)| j != o && s > twin_score)
                .count();
            if rank < cfg.twin_k {
                placed[k] += 1;
            }
            if k == 0 {
                ranks.push(rank as f64);
            }
        }
    }
    if !originals.is_empty() {
        let share = |n: usize| n as f64 / originals.len() as f64;
        m.insert(format!("twin_in_top{}", cfg.twin_k), share(placed[0]));
        m.insert(
            format!("twin_in_top{}_by_item_vector", cfg.twin_k),
            share(placed[1]),
        );
        ranks.sort_by(f64::total_cmp);
        m.insert("twin_rank_median".into(), ranks[ranks.len() / 2]);
    }
    Ok(m)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The metrics of [`similar_metrics`] as lines of text.
pub fn format_similar(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k:<42} {v:.4}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<ItemId> {
        v.iter().map(|s| ItemId::parse(*s).unwrap()).collect()
    }

    #[test]
    fn held_out_new_users_leave_training_with_their_first_five_rows_as_onboarding() {
        let row = |u: usize, i: usize, t: i64| Interaction {
            user_id: UserId::parse(format!("u{u}")).unwrap(),
            item_id: ItemId::parse(format!("i{i}")).unwrap(),
            rating: 1.0,
            timestamp: t,
            event_type: Default::default(),
        };
        let mut train = Vec::new();
        let mut test = Vec::new();
        for u in 0..200 {
            // Train rows in reverse time order, to check that onboarding takes the earliest.
            for i in (0..8).rev() {
                train.push(row(u, i, 100 + i as i64));
            }
            test.push(row(u, 8, 200));
            test.push(row(u, 9, 201));
        }
        let mut split = Split {
            dir: PathBuf::new(),
            on: On::Val,
            items: Vec::new(),
            train,
            onboard: Vec::new(),
            test,
            onboard_test: Vec::new(),
        };
        split.hold_out_new_users(10, 5, 7);
        let new_users: HashSet<&UserId> = split.onboard.iter().map(|r| &r.user_id).collect();
        assert!(
            (8..=35).contains(&new_users.len()),
            "about one user in ten is held out, got {}",
            new_users.len()
        );
        for u in &new_users {
            assert!(!split.train.iter().any(|r| &r.user_id == *u));
            assert!(!split.test.iter().any(|r| &r.user_id == *u));
            let onboard: Vec<i64> = split
                .onboard
                .iter()
                .filter(|r| &r.user_id == *u)
                .map(|r| r.timestamp)
                .collect();
            assert_eq!(onboard, vec![100, 101, 102, 103, 104]);
            let rest = split
                .onboard_test
                .iter()
                .filter(|r| &r.user_id == *u)
                .count();
            assert_eq!(
                rest, 5,
                "3 later train rows and 2 test rows are to be predicted"
            );
        }
        let rows =
            split.train.len() + split.test.len() + split.onboard.len() + split.onboard_test.len();
        assert_eq!(rows, 2000, "no row is lost");
    }

    #[test]
    fn pairwise_sum_matches_numpy_order() {
        // 0.1 summed 1000 times: score.py (numpy's order) gives 100.00000000000001,
        // a naive left-to-right loop gives 99.9999999999986.
        let a = vec![0.1f64; 1000];
        assert_eq!(np_sum(&a), 100.00000000000001);
        let naive: f64 = a.iter().sum();
        assert_ne!(np_sum(&a), naive);
    }

    #[test]
    fn user_metrics_by_hand() {
        let truth: HashSet<ItemId> = ids(&["b", "d", "z"]).into_iter().collect();
        let m = user_metrics(&ids(&["a", "b", "c", "d"]), &truth);
        assert_eq!(m["recall@10"], 2.0 / 3.0);
        assert_eq!(m["hitrate@10"], 1.0);
        assert_eq!(m["mrr@10"], 0.5);
        let dcg = 1.0 / 3f64.log2() + 1.0 / 5f64.log2();
        let idcg = 1.0 + 1.0 / 3f64.log2() + 1.0 / 4f64.log2();
        assert!((m["ndcg@10"] - dcg / idcg).abs() < 1e-15);
        let none = user_metrics(&[], &truth);
        assert_eq!(none["recall@20"], 0.0);
        assert_eq!(none["mrr@20"], 0.0);
    }

    #[test]
    fn top_k_excludes_and_breaks_ties_by_index() {
        let s = [0.5, 0.9, 0.9, 0.1, 0.7];
        assert_eq!(top_k(&s, 3, |_| true), vec![1, 2, 4]);
        assert_eq!(top_k(&s, 3, |i| i != 1), vec![2, 4, 0]);
        assert_eq!(top_k(&s, 10, |_| true).len(), 5);
    }
}
