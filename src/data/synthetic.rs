//! `tandem generate`: a synthetic storefront catalog and interaction log with structure a model
//! can learn, deterministic for a seed, written as it is generated.
//!
//! What is planted:
//! - **Catalog.** Items belong to one category (sometimes two), drawn with uneven category
//!   sizes. Each category has its own noun vocabulary for titles and its own tags; each item
//!   also has a *style* (classic, modern, ...) that appears in its title and tags and moves
//!   its price. Prices are log-normal around a per-category base; about 8% of items are
//!   unavailable; about 15% were created during the interaction window (tagged `new`).
//!   Attributes: `brand`, `region` (half the items name one or two of eu, us, uk, jp, br; the
//!   rest are sold everywhere), `language` (60% name one of en, de, fr, es, ja), `stock` and
//!   `promoted` (2%), drawn from their own random stream.
//! - **Popularity.** Item popularity follows a Zipf law over a random ranking, so a few items
//!   take a large share of the traffic (the top 1% are tagged `bestseller`).
//! - **Users.** Each user has 1 to 3 favourite categories with uneven weights and a preferred
//!   style in each, plus one emerging interest whose weight grows over the user's timeline
//!   (drift). Activity per user is log-normal, and every user has at least one interaction.
//! - **Sessions.** A user's history is a sequence of sessions days apart; each session focuses
//!   on one interest, and its events are seconds to minutes apart. A few events explore items
//!   by global popularity. A user touches an item at most once (the event records how far down
//!   the funnel they went), so a held-out item is never already known.
//! - **Events.** `event_type` is view, click, add_to_cart, purchase or rating; `rating` holds
//!   the event's strength (view 1, click 2, add_to_cart 3, purchase 4) or, for a rating event,
//!   stars from 0.5 to 5 that are higher for items that match the user's tastes.
//!
//! Memory: the catalog's compact traits and sampling tables stay in memory (about 60 bytes per
//! item); users are derived one at a time from their own random stream, so nothing per user or
//! per interaction is held. Interactions come out sorted by user id, then time.
//!
//! The random generator is a local SplitMix64 rather than `rand`'s, whose algorithms may change
//! between versions: the same seed must give the same bytes for as long as the demo model is
//! trained on them.

use super::format::{DataError, InteractionWriter, ItemWriter};
use crate::domain::{EventType, Interaction, Item, ItemId, Name, UserId};
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Bumped whenever the output for a given seed changes.
pub const GENERATOR_VERSION: u32 = 1;

/// Start of the interaction window: 2024-01-01T00:00:00Z.
pub const WINDOW_START: i64 = 1_704_067_200;
const DAY: i64 = 86_400;
/// Length of the window in which users start their histories and new items appear.
const WINDOW_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("--{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Data(#[from] DataError),
}

/// How much to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GenerateConfig {
    pub items: u64,
    pub users: u64,
    pub interactions: u64,
    pub seed: u64,
}

impl GenerateConfig {
    pub fn validate(&self) -> Result<(), GenerateError> {
        let invalid = |field, reason: String| GenerateError::Invalid { field, reason };
        if self.items == 0 || self.items > u32::MAX as u64 {
            return Err(invalid(
                "items",
                format!("{} is not between 1 and {}", self.items, u32::MAX),
            ));
        }
        if self.users == 0 {
            return Err(invalid("users", "must be at least 1".into()));
        }
        if self.interactions < self.users {
            return Err(invalid(
                "interactions",
                format!(
                    "{} is fewer than --users {}; every user gets at least one interaction",
                    self.interactions, self.users
                ),
            ));
        }
        Ok(())
    }
}

/// What `generate` wrote; also saved as `generate.json` next to the data.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateSummary {
    pub generator_version: u32,
    pub config: GenerateConfig,
    pub categories: Vec<&'static str>,
    pub styles: Vec<&'static str>,
    pub window_start: i64,
    pub items_file: PathBuf,
    pub interactions_file: PathBuf,
    pub seconds: f64,
}

struct CategorySpec {
    name: &'static str,
    /// Relative share of the catalog.
    weight: f64,
    /// Median price before the style factor.
    price: f64,
    nouns: &'static [&'static str],
    tags: &'static [&'static str],
}

#[rustfmt::skip]
const CATEGORIES: &[CategorySpec] = &[
    CategorySpec { name: "Electronics", weight: 3.0, price: 120.0, nouns: &["Headphones", "Speaker", "Charger", "Tablet", "Camera", "Monitor", "Router", "Earbuds", "Smartwatch", "Keyboard"], tags: &["wireless", "bluetooth", "usb-c", "4k", "noise-cancelling", "portable"] },
    CategorySpec { name: "Books", weight: 3.0, price: 14.0, nouns: &["Novel", "Cookbook", "Biography", "Thriller", "Atlas", "Memoir", "Anthology", "Guide", "Poems", "Saga"], tags: &["hardcover", "paperback", "bestselling-author", "illustrated", "first-edition", "series"] },
    CategorySpec { name: "Fashion", weight: 2.5, price: 45.0, nouns: &["Jacket", "Sneakers", "Dress", "Scarf", "Jeans", "Boots", "Shirt", "Sweater", "Coat", "Belt"], tags: &["cotton", "wool", "slim-fit", "unisex", "waterproof", "linen"] },
    CategorySpec { name: "Home", weight: 2.0, price: 60.0, nouns: &["Lamp", "Rug", "Cushion", "Vase", "Curtains", "Shelf", "Mirror", "Blanket", "Clock", "Planter"], tags: &["handmade", "ceramic", "oak", "scandinavian", "cozy", "decor"] },
    CategorySpec { name: "Kitchen", weight: 1.5, price: 35.0, nouns: &["Skillet", "Knife", "Blender", "Kettle", "Grinder", "Teapot", "Wok", "Mixer", "Pan", "Toaster"], tags: &["stainless", "cast-iron", "dishwasher-safe", "nonstick", "espresso", "baking"] },
    CategorySpec { name: "Sports", weight: 1.5, price: 50.0, nouns: &["Racket", "Yoga Mat", "Dumbbells", "Helmet", "Ball", "Gloves", "Jersey", "Bottle", "Tracker", "Shorts"], tags: &["training", "running", "cycling", "tennis", "fitness", "team"] },
    CategorySpec { name: "Outdoor", weight: 1.2, price: 80.0, nouns: &["Tent", "Backpack", "Sleeping Bag", "Headlamp", "Stove", "Trekking Poles", "Hammock", "Compass", "Cooler", "Rain Shell"], tags: &["camping", "hiking", "ultralight", "waterproof", "trail", "alpine"] },
    CategorySpec { name: "Beauty", weight: 1.2, price: 22.0, nouns: &["Serum", "Lipstick", "Moisturizer", "Perfume", "Shampoo", "Palette", "Mask", "Cleanser", "Balm", "Toner"], tags: &["vegan", "fragrance-free", "organic", "spf", "hydrating", "cruelty-free"] },
    CategorySpec { name: "Toys", weight: 1.0, price: 25.0, nouns: &["Puzzle", "Blocks", "Doll", "Robot", "Board Game", "Plush", "Kite", "Train Set", "Puppet", "Drone"], tags: &["educational", "ages-3-plus", "wooden", "stem", "family", "collectible"] },
    CategorySpec { name: "Games", weight: 1.0, price: 40.0, nouns: &["Controller", "Headset", "Console", "Adventure", "Racer", "Shooter", "Strategy", "Platformer", "Arcade Stick", "RPG"], tags: &["multiplayer", "co-op", "open-world", "indie", "retro", "esports"] },
    CategorySpec { name: "Music", weight: 0.8, price: 30.0, nouns: &["Vinyl", "Guitar", "Ukulele", "Synth", "Drum Pad", "Microphone", "Strings", "Amp", "Metronome", "Songbook"], tags: &["jazz", "rock", "classical", "electronic", "acoustic", "studio"] },
    CategorySpec { name: "Garden", weight: 0.8, price: 28.0, nouns: &["Seeds", "Hose", "Shears", "Pots", "Compost", "Trowel", "Bird Feeder", "Sprinkler", "Gloves", "Raised Bed"], tags: &["organic", "perennial", "balcony", "herbs", "irrigation", "pollinator"] },
    CategorySpec { name: "Pets", weight: 0.7, price: 20.0, nouns: &["Dog Bed", "Cat Tree", "Leash", "Chew Toy", "Aquarium", "Feeder", "Collar", "Litter", "Treats", "Carrier"], tags: &["dog", "cat", "grain-free", "washable", "aquatic", "puppy"] },
    CategorySpec { name: "Office", weight: 0.7, price: 18.0, nouns: &["Notebook", "Pen Set", "Desk Organizer", "Planner", "Stapler", "Desk Lamp", "Binder", "Chair Mat", "Whiteboard", "Calculator"], tags: &["ergonomic", "recycled", "refillable", "a5", "dotted", "desk"] },
    CategorySpec { name: "Grocery", weight: 0.6, price: 8.0, nouns: &["Coffee Beans", "Tea", "Olive Oil", "Chocolate", "Granola", "Honey", "Pasta", "Spices", "Nut Butter", "Hot Sauce"], tags: &["fair-trade", "gluten-free", "single-origin", "bulk", "spicy", "artisan"] },
    CategorySpec { name: "Baby", weight: 0.5, price: 26.0, nouns: &["Stroller", "Onesie", "Bottle", "Teether", "Bib", "Swaddle", "Monitor", "Rattle", "High Chair", "Play Mat"], tags: &["newborn", "bpa-free", "organic-cotton", "travel", "sensory", "soft"] },
];

/// Styles cut across categories; each also scales the price.
const STYLES: &[(&str, f64)] = &[
    ("classic", 1.0),
    ("modern", 1.15),
    ("vintage", 1.1),
    ("minimalist", 1.05),
    ("premium", 2.2),
    ("budget", 0.55),
];

const BRANDS: &[&str] = &[
    "Aldon", "Brisa", "Corvex", "Dunmore", "Elara", "Fenwick", "Galvo", "Hollis", "Istra", "Juno",
    "Kestrel", "Lumo", "Marlow", "Norvik", "Orla", "Pellam", "Quillon", "Rivet", "Solis", "Tamber",
    "Umbra", "Vesta", "Wexley", "Zephra",
];
const BRANDS_PER_CATEGORY: usize = 6;

/// Zipf exponent of item popularity over its random rank: the top 1% of items get roughly half
/// of the popularity mass, like a real storefront.
const ZIPF_EXPONENT: f64 = 1.0;
/// Share of events that ignore the user's tastes and follow global popularity.
const EXPLORE: f64 = 0.08;
/// Within a taste-driven pick, the chance to stay in the user's preferred style.
const STYLE_LOYALTY: f64 = 0.65;
/// After each event, the chance that the session's focus moves to another interest.
const FOCUS_SWITCH: f64 = 0.12;
/// Mean events per session.
const SESSION_MEAN: f64 = 4.0;
/// Mean gap between sessions.
const SESSION_GAP_MEAN: f64 = 2.5 * DAY as f64;
const UNAVAILABLE: f64 = 0.08;
const NEW_ITEM: f64 = 0.15;
/// Log-normal sigma of user activity, and its cap in multiples of the median.
const ACTIVITY_SIGMA: f64 = 1.0;
const ACTIVITY_CAP: f64 = 40.0;
/// Tries to find an item the user has not touched (and that exists yet) before falling back.
const PICK_TRIES: usize = 24;

/// SplitMix64: small, fast, and fully specified here, so output never depends on a crate's
/// choice of algorithm.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    /// An independent stream per (seed, purpose, index): users and items can be derived alone,
    /// in any order, and the same seed gives the same stream.
    fn stream(seed: u64, purpose: u64, index: u64) -> Rng {
        let mut r = Rng(seed ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let base = r.next_u64();
        let mut r = Rng(base ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next_u64();
        r
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Exponential with mean 1.
    fn exp(&mut self) -> f64 {
        -(1.0 - self.unit()).ln()
    }

    /// An index drawn with probability proportional to `weights`.
    fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.unit() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

const STREAM_RANKS: u64 = 1;
const STREAM_ITEM: u64 = 2;
const STREAM_USER: u64 = 3;
/// Attributes come from their own stream, so that adding them changed nothing else.
const STREAM_ATTRS: u64 = 4;

/// Regions an item may be sold in, and their weights; an item with no region is sold
/// everywhere ([`NO_REGION`] of them).
const REGIONS: &[(&str, f64)] = &[
    ("eu", 4.0),
    ("us", 4.0),
    ("uk", 2.0),
    ("jp", 1.5),
    ("br", 1.0),
];
const NO_REGION: f64 = 0.5;
/// Languages an item may be offered in; an item with no language suits every language.
const LANGUAGES: &[(&str, f64)] = &[
    ("en", 5.0),
    ("de", 2.0),
    ("fr", 2.0),
    ("es", 1.5),
    ("ja", 1.0),
];
const NO_LANGUAGE: f64 = 0.4;
/// Items marked `promoted`.
const PROMOTED: f64 = 0.02;

/// The generated attributes of one item: `brand` (the brand in its title), `region` (one or
/// two regions, or none), `language` (or none), `stock` (units, 0..200, a few nearly sold
/// out) and `promoted` (2% of items).
fn item_attributes(seed: u64, i: u64, brand: &str) -> crate::domain::Attributes {
    use crate::domain::AttrValue;
    let mut rng = Rng::stream(seed, STREAM_ATTRS, i);
    let pick = |rng: &mut Rng, table: &[(&'static str, f64)]| {
        let weights: Vec<f64> = table.iter().map(|(_, w)| *w).collect();
        Name::new(table[rng.weighted(&weights)].0)
    };
    let mut a = crate::domain::Attributes::new();
    a.insert("brand".into(), AttrValue::Text(brand.into()));
    if !rng.chance(NO_REGION) {
        let mut regions = vec![pick(&mut rng, REGIONS)];
        if rng.chance(0.3) {
            let second = pick(&mut rng, REGIONS);
            if !regions.contains(&second) {
                regions.push(second);
            }
        }
        a.insert("region".into(), AttrValue::List(regions.into()));
    }
    if !rng.chance(NO_LANGUAGE) {
        a.insert(
            "language".into(),
            AttrValue::Text(pick(&mut rng, LANGUAGES)),
        );
    }
    let stock = if rng.chance(0.1) {
        rng.below(5)
    } else {
        rng.below(200)
    };
    a.insert("stock".into(), AttrValue::Number(stock as f64));
    if rng.chance(PROMOTED) {
        a.insert("promoted".into(), AttrValue::Bool(true));
    }
    a
}

/// Items with their cumulative popularity, for sampling by popularity in O(log n).
#[derive(Default)]
struct PopTable {
    items: Vec<u32>,
    cum: Vec<f64>,
}

impl PopTable {
    fn push(&mut self, item: u32, weight: f64) {
        let last = self.cum.last().copied().unwrap_or(0.0);
        self.items.push(item);
        self.cum.push(last + weight);
    }

    fn sample(&self, rng: &mut Rng) -> Option<u32> {
        let total = *self.cum.last()?;
        let x = rng.unit() * total;
        let i = self
            .cum
            .partition_point(|&c| c <= x)
            .min(self.items.len() - 1);
        Some(self.items[i])
    }
}

/// What the interaction generator needs to know about an item.
struct ItemTraits {
    primary: u16,
    created_at: i64,
}

struct Catalog {
    traits: Vec<ItemTraits>,
    ids: Vec<ItemId>,
    global: PopTable,
    by_category: Vec<PopTable>,
    /// `by_style[category * STYLES.len() + style]`: items whose primary category is `category`.
    by_style: Vec<PopTable>,
}

/// Generates the catalog, writing `items.csv` as it goes and keeping only compact traits.
fn generate_catalog(cfg: &GenerateConfig, file: &Path) -> Result<Catalog, GenerateError> {
    let n = cfg.items as usize;
    // Popularity rank r (1-based) of each item: a seeded shuffle, so popularity is independent
    // of the id.
    let mut ranks: Vec<u32> = (1..=n as u32).collect();
    let mut rng = Rng::stream(cfg.seed, STREAM_RANKS, 0);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        ranks.swap(i, j);
    }
    let bestseller_rank = (n as u32 / 100).max(1);
    let category_weights: Vec<f64> = CATEGORIES.iter().map(|c| c.weight).collect();
    let n_styles = STYLES.len();
    let mut catalog = Catalog {
        traits: Vec::with_capacity(n),
        ids: Vec::with_capacity(n),
        global: PopTable::default(),
        by_category: (0..CATEGORIES.len()).map(|_| PopTable::default()).collect(),
        by_style: (0..CATEGORIES.len() * n_styles)
            .map(|_| PopTable::default())
            .collect(),
    };
    let mut writer = ItemWriter::create(file, true)?;
    for (i, &rank) in ranks.iter().enumerate() {
        let mut rng = Rng::stream(cfg.seed, STREAM_ITEM, i as u64);
        let primary = rng.weighted(&category_weights);
        let secondary = rng
            .chance(0.15)
            .then(|| rng.weighted(&category_weights))
            .filter(|&s| s != primary);
        let style = rng.below(n_styles as u64) as usize;
        let spec = &CATEGORIES[primary];
        let brand =
            BRANDS[(primary * 7 + rng.below(BRANDS_PER_CATEGORY as u64) as usize) % BRANDS.len()];
        let noun = spec.nouns[rng.below(spec.nouns.len() as u64) as usize];
        let (style_name, style_price) = STYLES[style];
        let mut title = format!("{brand} {} {noun}", capitalize(style_name));
        if rng.chance(0.5) {
            title.push_str(&format!(" {}", 100 + rng.below(900)));
        }
        let is_new = rng.chance(NEW_ITEM);
        let created_at = if is_new {
            WINDOW_START + rng.below((WINDOW_DAYS * DAY) as u64) as i64
        } else {
            WINDOW_START - 1 - rng.below((3 * WINDOW_DAYS * DAY) as u64) as i64
        };
        let mut tags = vec![Name::new(style_name)];
        for _ in 0..1 + rng.below(2) {
            let t = Name::new(spec.tags[rng.below(spec.tags.len() as u64) as usize]);
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        if rank <= bestseller_rank {
            tags.push("bestseller".into());
        }
        if is_new {
            tags.push("new".into());
        }
        let price = spec.price * style_price * (0.45 * rng.normal()).exp();
        let id = ItemId::parse((i + 1).to_string()).expect("numeric ids are valid");
        let mut item = Item::new(id.clone(), title);
        item.categories = std::iter::once(primary)
            .chain(secondary)
            .map(|c| CATEGORIES[c].name.into())
            .collect();
        item.tags = tags.into();
        item.price = Some(((price * 100.0).round() / 100.0).max(0.5) as f32);
        item.available = !rng.chance(UNAVAILABLE);
        item.created_at = Some(created_at);
        item.attributes = item_attributes(cfg.seed, i as u64, brand);
        writer.write(&item)?;

        let weight = (rank as f64).powf(-ZIPF_EXPONENT);
        let idx = i as u32;
        catalog.global.push(idx, weight);
        catalog.by_category[primary].push(idx, weight);
        if let Some(s) = secondary {
            catalog.by_category[s].push(idx, weight);
        }
        catalog.by_style[primary * n_styles + style].push(idx, weight);
        catalog.traits.push(ItemTraits {
            primary: primary as u16,
            created_at,
        });
        catalog.ids.push(id);
    }
    writer.finish()?;
    Ok(catalog)
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// One of a user's interests: a category, the style they like in it, and a weight.
#[derive(Debug, Clone, Copy)]
struct Interest {
    category: usize,
    style: usize,
    weight: f64,
}

/// A user's latent tastes, derived from their own random stream.
struct UserTastes {
    favourites: Vec<Interest>,
    /// Grows from 0 to `drift` of the total weight over the user's timeline.
    emerging: Interest,
    drift: f64,
}

/// The user's activity weight: always the first draw of their stream, so that the counting
/// pass and the writing pass agree without storing anything per user.
fn activity(rng: &mut Rng) -> f64 {
    (ACTIVITY_SIGMA * rng.normal()).exp().min(ACTIVITY_CAP)
}

fn user_tastes(rng: &mut Rng) -> UserTastes {
    let category_weights: Vec<f64> = CATEGORIES.iter().map(|c| c.weight).collect();
    let n_favourites = match rng.unit() {
        x if x < 0.4 => 1,
        x if x < 0.8 => 2,
        _ => 3,
    };
    let mut favourites: Vec<Interest> = Vec::with_capacity(3);
    while favourites.len() < n_favourites {
        let category = rng.weighted(&category_weights);
        if favourites.iter().any(|f| f.category == category) {
            continue;
        }
        favourites.push(Interest {
            category,
            style: rng.below(STYLES.len() as u64) as usize,
            weight: 0.2 + rng.exp(),
        });
    }
    let emerging = loop {
        let category = rng.weighted(&category_weights);
        if favourites.iter().all(|f| f.category != category) {
            break Interest {
                category,
                style: rng.below(STYLES.len() as u64) as usize,
                weight: 0.0,
            };
        }
    };
    UserTastes {
        favourites,
        emerging,
        drift: 0.7 * rng.unit(),
    }
}

impl UserTastes {
    /// The interest a session focuses on at `progress` (0 to 1) through the user's timeline.
    fn focus(&self, rng: &mut Rng, progress: f64) -> Interest {
        let fav_total: f64 = self.favourites.iter().map(|f| f.weight).sum();
        let emerging = self.drift * progress;
        let mut weights: Vec<f64> = self
            .favourites
            .iter()
            .map(|f| f.weight / fav_total * (1.0 - emerging))
            .collect();
        weights.push(emerging);
        let i = rng.weighted(&weights);
        self.favourites.get(i).copied().unwrap_or(self.emerging)
    }

    fn likes(&self, category: usize) -> bool {
        self.favourites.iter().any(|f| f.category == category)
    }
}

/// Picks an item for one event: the session's interest (preferred style first), else global
/// popularity; never an item the user already touched or one that does not exist yet, unless
/// the user has exhausted what exists.
fn pick_item(
    catalog: &Catalog,
    rng: &mut Rng,
    focus: Interest,
    explore: bool,
    now: i64,
    seen: &HashSet<u32>,
) -> u32 {
    let n_styles = STYLES.len();
    for attempt in 0..PICK_TRIES {
        // Later attempts widen the pool: preferred style, then the category, then everything.
        let table = if explore || attempt >= PICK_TRIES * 2 / 3 {
            &catalog.global
        } else if attempt < PICK_TRIES / 3 && rng.chance(STYLE_LOYALTY) {
            &catalog.by_style[focus.category * n_styles + focus.style]
        } else {
            &catalog.by_category[focus.category]
        };
        let Some(item) = table.sample(rng).or_else(|| catalog.global.sample(rng)) else {
            continue;
        };
        if !seen.contains(&item) && catalog.traits[item as usize].created_at <= now {
            return item;
        }
    }
    // Rare: a very active user in a small catalog. Scan from a random start for anything
    // unseen that exists; else repeat an existing item.
    let n = catalog.traits.len() as u32;
    let start = rng.below(n as u64) as u32;
    let exists = |i: u32| catalog.traits[i as usize].created_at <= now;
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| exists(i) && !seen.contains(&i))
        .or_else(|| (0..n).map(|k| (start + k) % n).find(|&i| exists(i)))
        .unwrap_or(start)
}

/// The event type and the `rating` value of one event.
fn event(rng: &mut Rng, liked: bool) -> (EventType, f32) {
    let x = rng.unit();
    // Liked items go further down the funnel.
    let (click, cart, purchase, rating) = if liked {
        (0.50, 0.72, 0.84, 0.92)
    } else {
        (0.62, 0.80, 0.87, 0.93)
    };
    if x < click {
        (EventType::View, 1.0)
    } else if x < cart {
        (EventType::Click, 2.0)
    } else if x < purchase {
        (EventType::AddToCart, 3.0)
    } else if x < rating {
        (EventType::Purchase, 4.0)
    } else {
        let stars = if liked {
            7 + rng.below(4) // 3.5 to 5
        } else {
            1 + rng.below(6) // 0.5 to 3
        };
        (EventType::Rating, stars as f32 / 2.0)
    }
}

/// Writes `out/items.csv`, `out/interactions.csv` and `out/generate.json`.
pub fn generate(cfg: &GenerateConfig, out: &Path) -> Result<GenerateSummary, GenerateError> {
    cfg.validate()?;
    let started = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| DataError::Io {
        file: out.to_path_buf(),
        source: e,
    })?;
    let items_file = out.join("items.csv");
    let interactions_file = out.join("interactions.csv");
    tracing::info!(items = cfg.items, seed = cfg.seed, "generating the catalog");
    let catalog = generate_catalog(cfg, &items_file)?;

    // Pass 1: total activity, so that per-user counts can add up to exactly --interactions.
    let mut total_activity = 0.0f64;
    for u in 0..cfg.users {
        total_activity += activity(&mut Rng::stream(cfg.seed, STREAM_USER, u));
    }

    tracing::info!(
        users = cfg.users,
        interactions = cfg.interactions,
        "generating interactions"
    );
    let progress = super::progress_bar(cfg.interactions, "interactions");
    let mut writer = InteractionWriter::create(&interactions_file, true)?;
    // Every user gets one interaction; the rest are shared by activity.
    let extra = (cfg.interactions - cfg.users) as f64;
    let mut cum_activity = 0.0f64;
    let mut assigned = 0u64;
    let mut written = 0u64;
    let mut seen: HashSet<u32> = HashSet::new();
    for u in 0..cfg.users {
        let mut rng = Rng::stream(cfg.seed, STREAM_USER, u);
        cum_activity += activity(&mut rng);
        let share = if u + 1 == cfg.users {
            extra as u64
        } else {
            (extra * (cum_activity / total_activity)).round() as u64
        };
        let count = 1 + share.saturating_sub(assigned);
        assigned = assigned.max(share);
        let tastes = user_tastes(&mut rng);
        let user_id = UserId::parse((u + 1).to_string()).expect("numeric ids are valid");
        let mut now = WINDOW_START + rng.below((WINDOW_DAYS * DAY * 4 / 5) as u64) as i64;
        seen.clear();
        let mut left_in_session = 0u64;
        let mut focus = tastes.focus(&mut rng, 0.0);
        for k in 0..count {
            if left_in_session == 0 {
                // A new session, days later, focused on one interest.
                if k > 0 {
                    now += 3600 + (rng.exp() * SESSION_GAP_MEAN) as i64;
                }
                left_in_session = 1 + (rng.exp() * (SESSION_MEAN - 1.0)).round() as u64;
                focus = tastes.focus(&mut rng, k as f64 / count as f64);
            } else {
                now += 5 + rng.below(600) as i64;
                if rng.chance(FOCUS_SWITCH) {
                    focus = tastes.focus(&mut rng, k as f64 / count as f64);
                }
            }
            left_in_session -= 1;
            let explore = rng.chance(EXPLORE);
            let item = pick_item(&catalog, &mut rng, focus, explore, now, &seen);
            seen.insert(item);
            let liked = tastes.likes(catalog.traits[item as usize].primary as usize);
            let (event_type, rating) = event(&mut rng, liked);
            writer.write(&Interaction {
                user_id: user_id.clone(),
                item_id: catalog.ids[item as usize].clone(),
                rating,
                timestamp: now,
                event_type,
            })?;
        }
        written += count;
        if u.is_multiple_of(4096) || u + 1 == cfg.users {
            progress.set_position(written);
        }
    }
    writer.finish()?;
    progress.finish_and_clear();
    debug_assert_eq!(written, cfg.interactions);

    let summary = GenerateSummary {
        generator_version: GENERATOR_VERSION,
        config: *cfg,
        categories: CATEGORIES.iter().map(|c| c.name).collect(),
        styles: STYLES.iter().map(|s| s.0).collect(),
        window_start: WINDOW_START,
        items_file,
        interactions_file,
        seconds: started.elapsed().as_secs_f64(),
    };
    let manifest = out.join("generate.json");
    // `seconds` is left out of the file so that the same seed gives the same bytes.
    let json = serde_json::json!({
        "generator_version": summary.generator_version,
        "config": summary.config,
        "categories": summary.categories,
        "styles": summary.styles,
        "window_start": summary.window_start,
    });
    std::fs::write(&manifest, format!("{json:#}\n")).map_err(|e| DataError::Io {
        file: manifest.clone(),
        source: e,
    })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_deterministic_and_independent() {
        let a: Vec<u64> = (0..4)
            .map(|_| Rng::stream(7, STREAM_USER, 1).next_u64())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::stream(7, STREAM_USER, 1).next_u64(),
            Rng::stream(7, STREAM_USER, 2).next_u64()
        );
        assert_ne!(
            Rng::stream(7, STREAM_USER, 1).next_u64(),
            Rng::stream(8, STREAM_USER, 1).next_u64()
        );
    }

    #[test]
    fn below_and_unit_stay_in_range() {
        let mut r = Rng::stream(1, 1, 1);
        for _ in 0..10_000 {
            assert!(r.below(7) < 7);
            let x = r.unit();
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn bad_sizes_are_rejected_with_the_flag_name() {
        let cfg = GenerateConfig {
            items: 10,
            users: 5,
            interactions: 4,
            seed: 1,
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("--interactions:"), "{err}");
        let cfg = GenerateConfig { items: 0, ..cfg };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--items:"));
    }
}
