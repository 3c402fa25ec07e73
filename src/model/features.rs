//! Featurization: how an [`Item`] becomes a bag of weighted rows of the shared embedding table.
//!
//! Everything here is a pure function of the [`FeatureConfig`] stored in the manifest (hash
//! seed, bucket counts, year and price bucketing) plus the id table stored in the checkpoint,
//! so serving rebuilds exactly the featurization that training used. `docs/checkpoint.md`
//! spells the same rules out for a re-implementation in another language.

use crate::domain::{EventType, Item};
use serde::{Deserialize, Serialize};

/// Bucket counts, hash seed and numeric bucketing. Rows of the embedding table are laid out
/// in this order: ids, categories, tokens, years, prices, popularity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureConfig {
    /// Seed mixed into every hash (FNV-1a 64, see [`hash`]).
    pub hash_seed: u64,
    /// Slots of the open-addressing item id table (a power of two, at most half full).
    pub id_buckets: usize,
    pub category_buckets: usize,
    /// Hashed title words and tags.
    pub token_buckets: usize,
    /// Year bucket `b = clamp((year - year_min) / year_step, 0, year_buckets - 1)`.
    pub year_min: i32,
    pub year_step: i32,
    pub year_buckets: usize,
    /// Price bucket `b = min(floor(log2(1 + price) * 2), price_buckets - 1)`.
    pub price_buckets: usize,
    /// Popularity bucket of a trained item: `min(floor(log2(count)) + 1, popularity_buckets - 1)`.
    pub popularity_buckets: usize,
    /// The popularity bucket given to items unseen in training (a prior, so that content-only
    /// items do not look like average, fairly popular items).
    pub unseen_popularity_bucket: usize,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig {
            hash_seed: 0x7461_6e64_656d,
            id_buckets: 1 << 15,
            category_buckets: 512,
            token_buckets: 1 << 14,
            year_min: 1900,
            year_step: 5,
            year_buckets: 28,
            price_buckets: 24,
            popularity_buckets: 16,
            unseen_popularity_bucket: 1,
        }
    }
}

/// First row of each feature block in the embedding table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowOffsets {
    pub id: usize,
    pub category: usize,
    pub token: usize,
    pub year: usize,
    pub price: usize,
    pub popularity: usize,
    pub total: usize,
}

impl FeatureConfig {
    pub fn offsets(&self) -> RowOffsets {
        let id = 0;
        let category = id + self.id_buckets;
        let token = category + self.category_buckets;
        let year = token + self.token_buckets;
        let price = year + self.year_buckets;
        let popularity = price + self.price_buckets;
        RowOffsets {
            id,
            category,
            token,
            year,
            price,
            popularity,
            total: popularity + self.popularity_buckets,
        }
    }

    /// Checks the numbers a hand-edited manifest could get wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !self.id_buckets.is_power_of_two() {
            return Err(format!(
                "features.id_buckets = {} must be a power of two",
                self.id_buckets
            ));
        }
        for (name, v) in [
            ("category_buckets", self.category_buckets),
            ("token_buckets", self.token_buckets),
            ("year_buckets", self.year_buckets),
            ("price_buckets", self.price_buckets),
            ("popularity_buckets", self.popularity_buckets),
        ] {
            if v == 0 {
                return Err(format!("features.{name} must be at least 1"));
            }
        }
        if self.year_step <= 0 {
            return Err("features.year_step must be positive".into());
        }
        if self.unseen_popularity_bucket >= self.popularity_buckets {
            return Err(
                "features.unseen_popularity_bucket must be below popularity_buckets".into(),
            );
        }
        Ok(())
    }

    pub fn year_bucket(&self, year: i32) -> usize {
        // In i64: any i32 year is valid input (`year: -2147483647` overflowed the i32 and
        // answered 500).
        let b = (i64::from(year) - i64::from(self.year_min)).div_euclid(i64::from(self.year_step));
        b.clamp(0, self.year_buckets as i64 - 1) as usize
    }

    pub fn price_bucket(&self, price: f32) -> usize {
        let b = ((1.0 + price.max(0.0)).log2() * 2.0).floor() as usize;
        b.min(self.price_buckets - 1)
    }

    pub fn popularity_bucket(&self, count: f32) -> usize {
        if count < 1.0 {
            return self.unseen_popularity_bucket;
        }
        ((count.log2().floor() as usize) + 1).min(self.popularity_buckets - 1)
    }
}

/// How the user tower pools a history: newest first, weight `0.5^(k / half_life) * event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolingConfig {
    /// Only the newest `max_history` events count.
    pub max_history: usize,
    /// Recency half-life in events (position 0 is the newest).
    pub half_life: f32,
    pub event_weights: EventWeights,
}

impl Default for PoolingConfig {
    fn default() -> Self {
        PoolingConfig {
            max_history: 50,
            half_life: 5.0,
            event_weights: EventWeights::default(),
        }
    }
}

impl PoolingConfig {
    /// The (unnormalized) weight of the event at recency position `k` (0 = newest).
    pub fn weight(&self, k: usize, event: EventType) -> f32 {
        let recency = if self.half_life > 0.0 {
            0.5f32.powf(k as f32 / self.half_life)
        } else {
            1.0
        };
        recency * self.event_weights.get(event)
    }
}

/// Relative weight of each event type in the user pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventWeights {
    pub view: f32,
    pub click: f32,
    pub add_to_cart: f32,
    pub purchase: f32,
    pub rating: f32,
    pub impression: f32,
}

impl Default for EventWeights {
    fn default() -> Self {
        EventWeights {
            view: 0.5,
            click: 0.75,
            add_to_cart: 1.0,
            purchase: 1.25,
            rating: 1.0,
            impression: 0.1,
        }
    }
}

impl EventWeights {
    pub fn get(&self, e: EventType) -> f32 {
        match e {
            EventType::View => self.view,
            EventType::Click => self.click,
            EventType::AddToCart => self.add_to_cart,
            EventType::Purchase => self.purchase,
            EventType::Rating => self.rating,
            EventType::Impression => self.impression,
        }
    }
}

/// FNV-1a 64 over `namespace`, the byte 0x1f, then `value`, starting from the offset basis
/// XOR `seed`. Namespaces keep an id "7" and a token "7" apart.
pub fn hash(seed: u64, namespace: &str, value: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in namespace
        .bytes()
        .chain(std::iter::once(0x1f))
        .chain(value.bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The id table: open addressing with linear probing over `id_buckets` slots. A slot holds the
/// 32-bit fingerprint of the item trained into it (0 = empty) and that item's training count.
/// Exact for trained items (up to a 1 in 2^32 fingerprint clash), and an unseen item finds an
/// empty slot, so it gets no id row: its vector is content-only.
#[derive(Debug, Clone, PartialEq)]
pub struct IdTable {
    pub keys: Vec<u32>,
    pub counts: Vec<f32>,
}

impl IdTable {
    pub fn new(buckets: usize) -> Self {
        IdTable {
            keys: vec![0; buckets],
            counts: vec![0.0; buckets],
        }
    }

    fn start_and_key(seed: u64, buckets: usize, item_id: &str) -> (usize, u32) {
        let start = (hash(seed, "id", item_id) as usize) & (buckets - 1);
        let key = ((hash(seed, "idkey", item_id) >> 32) as u32).max(1);
        (start, key)
    }

    /// The slot of a trained item, or `None` for an unseen one.
    pub fn lookup(&self, seed: u64, item_id: &str) -> Option<usize> {
        let n = self.keys.len();
        let (start, key) = Self::start_and_key(seed, n, item_id);
        for probe in 0..n {
            let slot = (start + probe) & (n - 1);
            match self.keys[slot] {
                0 => return None,
                k if k == key => return Some(slot),
                _ => {}
            }
        }
        None
    }

    /// Inserts a trained item (idempotent) and returns its slot. The caller keeps the table at
    /// most half full, so probing stays short and always ends.
    pub fn insert(&mut self, seed: u64, item_id: &str, count: f32) -> usize {
        let n = self.keys.len();
        let (start, key) = Self::start_and_key(seed, n, item_id);
        for probe in 0..n {
            let slot = (start + probe) & (n - 1);
            if self.keys[slot] == 0 || self.keys[slot] == key {
                self.keys[slot] = key;
                self.counts[slot] = count;
                return slot;
            }
        }
        panic!("id table is full: the trainer sizes it to at most half full")
    }

    pub fn len(&self) -> usize {
        self.keys.iter().filter(|&&k| k != 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One item's features: its id slot (if trained) and its weighted content rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemFeatures {
    /// Row of the id embedding; `None` for items unseen in training.
    pub id_row: Option<u32>,
    /// (row, weight) pairs: categories and tokens averaged within their block, year, price and
    /// popularity with weight 1.
    pub content: Vec<(u32, f32)>,
}

/// Case-folded words of a title without its trailing "(1995)", in any script:
/// - words are runs of letters and digits (with their combining marks, so that an Arabic or
///   Hebrew word with vowel marks, or a decomposed "é", stays one word), of at least two
///   characters;
/// - marks and the Arabic tatweel are dropped (they are optional in the script), and the
///   word is case-folded: lower case, Greek final sigma and tonos folded (`ΟΔΥΣΣΕΑΣ` and
///   `Οδυσσέας` give the same token), `ß` as `ss`;
/// - Chinese, Japanese and Korean write no spaces between words, so a run of those
///   characters gives its overlapping character pairs (`星球大战` → 星球, 球大, 大战), or the
///   character itself when it stands alone.
///
/// Titles in Latin script without marks tokenize as they always did, so older checkpoints
/// see the same tokens for them.
pub fn title_tokens(title: &str) -> Vec<String> {
    let title = strip_year(title).0;
    let mut out: Vec<String> = Vec::new();
    let mut push = |w: String| {
        if !out.contains(&w) {
            out.push(w);
        }
    };
    for w in title.split(|c: char| !(c.is_alphanumeric() || is_mark(c))) {
        let folded = fold_word(w);
        let chars: Vec<char> = folded.chars().collect();
        // Runs of CJK and of other characters, each tokenized its own way.
        let mut start = 0;
        while start < chars.len() {
            let cjk = is_cjk(chars[start]);
            let end = (start..chars.len())
                .find(|&i| is_cjk(chars[i]) != cjk)
                .unwrap_or(chars.len());
            let run = &chars[start..end];
            if cjk {
                if run.len() == 1 {
                    push(run[0].to_string());
                }
                for pair in run.windows(2) {
                    push(pair.iter().collect());
                }
            } else if run.len() >= 2 {
                push(run.iter().collect());
            }
            start = end;
        }
    }
    out
}

/// Lower case, then the full case folds that lower case leaves out, without marks.
fn fold_word(w: &str) -> String {
    let mut out = String::with_capacity(w.len());
    for c in w.chars().filter(|&c| !is_mark(c) && c != '\u{0640}') {
        for l in c.to_lowercase() {
            match l {
                'ς' => out.push('σ'),
                'ß' => out.push_str("ss"),
                'ά' => out.push('α'),
                'έ' => out.push('ε'),
                'ή' => out.push('η'),
                'ί' | 'ϊ' | 'ΐ' => out.push('ι'),
                'ό' => out.push('ο'),
                'ύ' | 'ϋ' | 'ΰ' => out.push('υ'),
                'ώ' => out.push('ω'),
                l => out.push(l),
            }
        }
    }
    out
}

/// Combining marks of the scripts catalogs commonly use (Latin diacritics written apart,
/// Hebrew points, Arabic harakat, Devanagari signs, Japanese voicing marks) and the joiners
/// that Persian and Indic text place inside words.
fn is_mark(c: char) -> bool {
    matches!(c,
        '\u{0300}'..='\u{036F}'
        | '\u{0483}'..='\u{0489}'
        | '\u{0591}'..='\u{05BD}'
        | '\u{05BF}' | '\u{05C1}' | '\u{05C2}' | '\u{05C4}' | '\u{05C5}' | '\u{05C7}'
        | '\u{0610}'..='\u{061A}'
        | '\u{064B}'..='\u{065F}'
        | '\u{0670}'
        | '\u{06D6}'..='\u{06DC}'
        | '\u{06DF}'..='\u{06E4}'
        | '\u{06E7}' | '\u{06E8}'
        | '\u{06EA}'..='\u{06ED}'
        | '\u{0900}'..='\u{0903}'
        | '\u{093A}'..='\u{094F}'
        | '\u{0951}'..='\u{0957}'
        | '\u{0962}' | '\u{0963}'
        | '\u{1AB0}'..='\u{1AFF}'
        | '\u{1DC0}'..='\u{1DFF}'
        | '\u{200C}' | '\u{200D}'
        | '\u{20D0}'..='\u{20FF}'
        | '\u{3099}' | '\u{309A}'
        | '\u{FE20}'..='\u{FE2F}'
    )
}

/// Han ideographs, kana (with the prolonged-sound mark) and Hangul: scripts written without
/// spaces between words.
fn is_cjk(c: char) -> bool {
    matches!(c,
        '\u{3040}'..='\u{30FF}'
        | '\u{31F0}'..='\u{31FF}'
        | '\u{3400}'..='\u{4DBF}'
        | '\u{4E00}'..='\u{9FFF}'
        | '\u{F900}'..='\u{FAFF}'
        | '\u{FF66}'..='\u{FF9F}'
        | '\u{20000}'..='\u{2FA1F}'
    )
}

/// Splits "Heat (1995)" into ("Heat", Some(1995)).
pub fn strip_year(title: &str) -> (&str, Option<i32>) {
    let t = title.trim_end();
    if let Some(open) = t.rfind('(') {
        let inner = &t[open + 1..];
        if let Some(digits) = inner.strip_suffix(')') {
            if digits.len() == 4 && digits.bytes().all(|b| b.is_ascii_digit()) {
                return (t[..open].trim_end(), digits.parse().ok());
            }
        }
    }
    (t, None)
}

/// Turns items into table rows. Built from the manifest's [`FeatureConfig`] and the id table.
#[derive(Debug, Clone)]
pub struct Featurizer {
    pub config: FeatureConfig,
    pub offsets: RowOffsets,
    pub ids: IdTable,
}

impl Featurizer {
    pub fn new(config: FeatureConfig, ids: IdTable) -> Self {
        let offsets = config.offsets();
        Featurizer {
            config,
            offsets,
            ids,
        }
    }

    /// The training count of an item (0 for items unseen in training).
    pub fn popularity(&self, item_id: &str) -> f32 {
        self.ids
            .lookup(self.config.hash_seed, item_id)
            .map_or(0.0, |s| self.ids.counts[s])
    }

    pub fn features(&self, item: &Item) -> ItemFeatures {
        let slot = self
            .ids
            .lookup(self.config.hash_seed, item.item_id.as_str());
        self.features_in_slot(item, slot)
    }

    /// The features the item would have as a brand-new item: no id row and the unseen
    /// popularity bucket, so content alone (categories, tokens, year, price) places it.
    /// A trained item's content twin gets exactly these.
    pub fn content_features(&self, item: &Item) -> ItemFeatures {
        self.features_in_slot(item, None)
    }

    fn features_in_slot(&self, item: &Item, slot: Option<usize>) -> ItemFeatures {
        let c = &self.config;
        let o = &self.offsets;
        let seed = c.hash_seed;
        let mut content = Vec::with_capacity(12);

        let cats: Vec<&str> = item
            .categories
            .iter()
            .map(|g| g.trim())
            .filter(|g| !g.is_empty() && *g != "(no genres listed)")
            .collect();
        for g in &cats {
            let b = hash(seed, "cat", &g.to_lowercase()) as usize % c.category_buckets;
            content.push(((o.category + b) as u32, 1.0 / cats.len() as f32));
        }

        let mut toks: Vec<u32> = title_tokens(&item.title)
            .iter()
            .map(|t| (hash(seed, "tok", t) as usize % c.token_buckets) as u32)
            .collect();
        toks.extend(item.tags.iter().filter(|t| !t.trim().is_empty()).map(|t| {
            (hash(seed, "tag", &t.trim().to_lowercase()) as usize % c.token_buckets) as u32
        }));
        for t in &toks {
            content.push((o.token as u32 + t, 1.0 / toks.len() as f32));
        }

        if let Some(y) = item.year.or_else(|| strip_year(&item.title).1) {
            content.push(((o.year + c.year_bucket(y)) as u32, 1.0));
        }
        if let Some(p) = item.price {
            content.push(((o.price + c.price_bucket(p)) as u32, 1.0));
        }
        let count = slot.map_or(0.0, |s| self.ids.counts[s]);
        content.push(((o.popularity + c.popularity_bucket(count)) as u32, 1.0));

        ItemFeatures {
            id_row: slot.map(|s| (o.id + s) as u32),
            content,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ItemId;

    #[test]
    fn hash_is_stable() {
        // Pinned so that a change to the hash (which would silently break every checkpoint)
        // fails here. The value comes from an independent Python FNV-1a 64 of b"id\x1f42", seed 0.
        assert_eq!(hash(0, "id", "42"), 0x5f0d_773c_4203_80cb);
        assert_ne!(hash(0, "id", "42"), hash(0, "tok", "42"));
        assert_ne!(hash(0, "id", "42"), hash(1, "id", "42"));
    }

    #[test]
    fn id_table_is_exact_for_trained_items() {
        let mut t = IdTable::new(64);
        let ids: Vec<String> = (0..32).map(|i| format!("item{i}")).collect();
        let slots: Vec<usize> = ids.iter().map(|i| t.insert(7, i, 3.0)).collect();
        for (i, s) in ids.iter().zip(&slots) {
            assert_eq!(t.lookup(7, i), Some(*s));
        }
        let mut uniq = slots.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 32, "every trained item has its own slot");
        assert_eq!(t.lookup(7, "never-seen"), None);
    }

    #[test]
    fn titles_years_and_buckets() {
        assert_eq!(
            strip_year("American President, The (1995)"),
            ("American President, The", Some(1995))
        );
        assert_eq!(strip_year("Babylon 5"), ("Babylon 5", None));
        assert_eq!(title_tokens("Toy Story 2 (1999)"), vec!["toy", "story"]);
        let c = FeatureConfig::default();
        assert_eq!(c.year_bucket(1850), 0);
        assert_eq!(c.year_bucket(1995), 19);
        assert_eq!(c.year_bucket(3000), c.year_buckets - 1);
        assert_eq!(c.popularity_bucket(0.0), c.unseen_popularity_bucket);
        assert_eq!(c.popularity_bucket(1.0), 1);
        assert_eq!(c.popularity_bucket(8.0), 4);
    }

    #[test]
    fn unseen_item_has_no_id_row_but_has_content() {
        let f = Featurizer::new(FeatureConfig::default(), IdTable::new(1 << 15));
        let mut item = Item::new(ItemId::parse("x").unwrap(), "Heat (1995)");
        item.categories = ["Crime".into(), "Action".into()].into();
        let feats = f.features(&item);
        assert_eq!(feats.id_row, None);
        // two categories, one token, year, popularity
        assert_eq!(feats.content.len(), 5);
        let cat_weight: f32 = feats.content[..2].iter().map(|(_, w)| w).sum();
        assert!((cat_weight - 1.0).abs() < 1e-6);
    }

    #[test]
    fn latin_titles_tokenize_as_before() {
        assert_eq!(
            title_tokens("The Lord of the Rings: The Two Towers (2002)"),
            ["the", "lord", "of", "rings", "two", "towers"]
        );
        assert_eq!(title_tokens("Amélie (2001)"), ["amélie"]);
        assert_eq!(title_tokens("WALL·E"), ["wall"]);
    }

    #[test]
    fn chinese_and_japanese_titles_give_character_pairs() {
        assert_eq!(title_tokens("星球大战 (1977)"), ["星球", "球大", "大战"]);
        // Kanji and kana mixed, the prolonged-sound mark kept inside katakana words, and
        // the middle dot between words a separator.
        assert_eq!(
            title_tokens("千と千尋の神隠し"),
            ["千と", "と千", "千尋", "尋の", "の神", "神隠", "隠し"]
        );
        assert_eq!(
            title_tokens("スター・ウォーズ"),
            ["スタ", "ター", "ウォ", "ォー", "ーズ"]
        );
        // A lone ideograph is a word; a CJK run next to Latin letters splits from them.
        assert_eq!(title_tokens("猫 Cat"), ["猫", "cat"]);
        assert_eq!(title_tokens("東京Story"), ["東京", "story"]);
        // Full-width digits are digits.
        assert_eq!(title_tokens("ＡＢ１２"), ["ａｂ１２"]);
    }

    #[test]
    fn greek_titles_fold_case_sigma_and_tonos() {
        let upper = title_tokens("Η ΟΔΥΣΣΕΙΑ ΤΟΥ ΟΔΥΣΣΕΑ");
        let lower = title_tokens("η Οδύσσεια του Οδυσσέα");
        assert_eq!(upper, ["οδυσσεια", "του", "οδυσσεα"]);
        assert_eq!(upper, lower);
        // Final sigma folds to σ, so a word ends the same however it is cased.
        assert_eq!(title_tokens("ΚΟΣΜΟΣ"), title_tokens("κόσμος"));
        assert_eq!(title_tokens("κόσμος"), ["κοσμοσ"]);
    }

    #[test]
    fn arabic_titles_keep_words_whole_without_marks() {
        // With harakat (vowel marks) and tatweel the words are the same as without them.
        let plain = title_tokens("الملك الأسد");
        assert_eq!(plain, ["الملك", "الأسد"]);
        assert_eq!(title_tokens("المَلِك الأَسَد"), plain);
        assert_eq!(title_tokens("المـلك الأسد"), plain);
        // Arabic-Indic digits are digits.
        assert_eq!(title_tokens("رقم ١٢"), ["رقم", "١٢"]);
    }

    #[test]
    fn casefolding_is_unicode_aware() {
        assert_eq!(title_tokens("STRASSE Straße"), ["strasse"]);
        assert_eq!(title_tokens("ÉCOLE école"), ["école"]);
        // A decomposed é (e + U+0301) stays one word, folded like the precomposed one
        // without its mark.
        assert_eq!(title_tokens("Cafe\u{301} Noir"), ["cafe", "noir"]);
        assert_eq!(title_tokens("ПРИВЕТ привет"), ["привет"]);
    }

    #[test]
    fn every_i32_year_has_a_bucket() {
        let c = FeatureConfig::default();
        assert_eq!(c.year_bucket(i32::MIN), 0);
        assert_eq!(c.year_bucket(-2_147_483_647), 0);
        assert_eq!(c.year_bucket(i32::MAX), c.year_buckets - 1);
        assert_eq!(c.year_bucket(1999), ((1999 - 1900) / 5) as usize);
    }
}
