//! Data in tandem's common format, and the ways to get it: MovieLens import, the synthetic
//! generator, and the evaluation split.

pub mod format;
pub mod movielens;
pub mod split;
pub mod synthetic;

pub use format::{
    find_file, for_each_interaction, for_each_item, read_interactions, read_items, DataError,
};

use crate::domain::{Interaction, Item};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::hash::Hash;
use std::path::Path;

/// Maps external string ids to dense `u32` indices, in first-seen order.
#[derive(Debug, Clone)]
pub struct IdMap<K> {
    index: HashMap<K, u32>,
    keys: Vec<K>,
}

impl<K> Default for IdMap<K> {
    fn default() -> Self {
        IdMap {
            index: HashMap::new(),
            keys: Vec::new(),
        }
    }
}

impl<K: Clone + Eq + Hash> IdMap<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The index of `key`, adding it if new.
    pub fn insert(&mut self, key: &K) -> u32 {
        if let Some(&i) = self.index.get(key) {
            return i;
        }
        let i = self.keys.len() as u32;
        self.index.insert(key.clone(), i);
        self.keys.push(key.clone());
        i
    }

    pub fn get(&self, key: &K) -> Option<u32> {
        self.index.get(key).copied()
    }

    pub fn key(&self, i: u32) -> &K {
        &self.keys[i as usize]
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[K] {
        &self.keys
    }
}

/// A catalog and its interactions, as read from a data directory.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub items: Vec<Item>,
    pub interactions: Vec<Interaction>,
}

impl Dataset {
    /// Reads `dir/items.{csv,jsonl}` and `dir/interactions.{csv,jsonl}`.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        Ok(Dataset {
            items: read_items(&find_file(dir, "items")?)?,
            interactions: read_interactions(&find_file(dir, "interactions")?)?,
        })
    }
}

/// A progress bar on stderr for `len` units of `what`. It draws only on a terminal; logs and
/// tests stay clean.
pub(crate) fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(4));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {human_pos}/{human_len} ({per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A counter on stderr for work of unknown length.
pub(crate) fn progress_spinner(what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg}: {human_pos} ({per_sec})")
            .expect("valid template"),
    );
    bar.set_message(what.to_string());
    bar
}
