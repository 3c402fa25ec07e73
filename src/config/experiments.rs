//! Experiment definitions (`[[experiments]]` in config, replaced at run time by
//! `PUT /admin/experiments`): their validation and the deterministic assignment of a unit
//! id to a variant. The running counters and reports are `crate::experiment`'s.
//!
//! Assignment hashes `salt || 0x00 || unit id` with SHA-256, so a user lands in the same
//! variant on every replica and after every restart; a new salt reshuffles everyone
//! independently of the old assignment.

use super::{ConfigError, RerankWeights};
use crate::domain::{SessionId, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Tolerance on the sum of traffic shares (they are written by hand as decimals).
const SHARE_TOLERANCE: f64 = 1e-6;

/// Which id a user is bucketed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// The user id, or the session id for anonymous traffic.
    #[default]
    User,
    /// The session id only (a user gets a fresh draw per session).
    Session,
}

/// One experiment, as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// 1 to 64 letters, digits, '-', '_' or '.'.
    pub name: String,
    /// Mixed into the assignment hash; change it to reshuffle.
    pub salt: String,
    #[serde(default)]
    pub unit: Unit,
    /// At most one experiment is enabled at a time; a disabled one keeps its report.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    pub variants: Vec<Variant>,
}

fn enabled_by_default() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// The `variant` that responses carry and events send back.
    pub name: String,
    /// Fraction of the traffic, 0..=1; the shares of an experiment sum to 1.
    pub share: f64,
    /// The model this arm is meant for (must be registered; see the admin API for the rule).
    #[serde(default)]
    pub model_version: Option<String>,
    /// The re-rank weights of this arm; without it the arm uses `[rerank.<name>]`, or control's.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub rerank: Option<RerankWeights>,
}

/// The model versions that enabled experiments' variants pin, each once.
pub fn pinned_models(experiments: &[Experiment]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in experiments.iter().filter(|e| e.enabled) {
        for v in &e.variants {
            if let Some(m) = &v.model_version {
                if !out.contains(m) {
                    out.push(m.clone());
                }
            }
        }
    }
    out
}

fn invalid(field: String, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Checks a whole experiment set: names, salts, shares summing to 1, unique variants, valid
/// weights, and at most one enabled experiment. Each error names the field.
pub fn validate(experiments: &[Experiment]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    let mut enabled: Option<&str> = None;
    for (i, e) in experiments.iter().enumerate() {
        let at = format!("experiments[{i}]");
        if !valid_name(&e.name) {
            return Err(invalid(
                format!("{at}.name"),
                format!(
                    "{:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
                    e.name
                ),
            ));
        }
        if !names.insert(e.name.as_str()) {
            return Err(invalid(
                format!("{at}.name"),
                format!("{:?} is used twice", e.name),
            ));
        }
        if e.salt.is_empty() {
            return Err(invalid(format!("{at}.salt"), "must not be empty"));
        }
        if e.variants.is_empty() {
            return Err(invalid(
                format!("{at}.variants"),
                "needs at least one variant",
            ));
        }
        let mut variant_names = std::collections::HashSet::new();
        let mut total = 0.0;
        for (j, v) in e.variants.iter().enumerate() {
            let vat = format!("{at}.variants[{j}]");
            if !valid_name(&v.name) {
                return Err(invalid(
                    format!("{vat}.name"),
                    format!(
                        "{:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
                        v.name
                    ),
                ));
            }
            if !variant_names.insert(v.name.as_str()) {
                return Err(invalid(
                    format!("{vat}.name"),
                    format!("{:?} is used twice in this experiment", v.name),
                ));
            }
            if !v.share.is_finite() || !(0.0..=1.0).contains(&v.share) {
                return Err(invalid(
                    format!("{vat}.share"),
                    format!("{} is not between 0 and 1", v.share),
                ));
            }
            total += v.share;
            if let Some(w) = &v.rerank {
                w.validate(&format!("{vat}.rerank"))?;
            }
        }
        if (total - 1.0).abs() > SHARE_TOLERANCE {
            return Err(invalid(
                format!("{at}.variants"),
                format!("the shares sum to {total}, not 1"),
            ));
        }
        if e.enabled {
            if let Some(other) = enabled {
                return Err(invalid(
                    format!("{at}.enabled"),
                    format!(
                        "experiment {other:?} is already enabled; a request carries one variant, so only one experiment runs at a time"
                    ),
                ));
            }
            enabled = Some(&e.name);
        }
    }
    Ok(())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Where `unit_id` falls in [0, 1) for `salt`: the first 8 bytes of SHA-256, as a fraction.
pub fn position(salt: &str, unit_id: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0u8]);
    h.update(unit_id.as_bytes());
    let d = h.finalize();
    let x = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    // 53 bits keep the division exact in f64.
    (x >> 11) as f64 / (1u64 << 53) as f64
}

impl Experiment {
    /// The variant of a unit id: walks the cumulative shares.
    pub fn assign(&self, unit_id: &str) -> &Variant {
        let x = position(&self.salt, unit_id);
        let mut cumulative = 0.0;
        for v in &self.variants {
            cumulative += v.share;
            if x < cumulative {
                return v;
            }
        }
        // Rounding left x just above the last boundary.
        self.variants
            .iter()
            .rev()
            .find(|v| v.share > 0.0)
            .unwrap_or(&self.variants[self.variants.len() - 1])
    }
}

/// The assignment of a request under the running set: the enabled experiment's variant for
/// the request's unit id, or `None` when no experiment runs or the request has no id to hash
/// (it then gets control).
pub fn assign(
    set: &[Experiment],
    user: Option<&UserId>,
    session: Option<&SessionId>,
) -> Option<Assignment> {
    let e = set.iter().find(|e| e.enabled)?;
    let unit_id = match e.unit {
        Unit::User => user
            .map(|u| format!("u:{u}"))
            .or_else(|| session.map(|s| format!("s:{s}")))?,
        Unit::Session => session.map(|s| format!("s:{s}"))?,
    };
    let v = e.assign(&unit_id);
    Some(Assignment {
        experiment: Arc::from(e.name.as_str()),
        variant: v.name.clone(),
        model_version: v.model_version.clone(),
    })
}

/// What a request was assigned to.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub experiment: Arc<str>,
    pub variant: String,
    pub model_version: Option<String>,
}

/// An enabled experiment `home` with these variant shares, for tests.
#[cfg(test)]
pub(crate) fn sample(salt: &str, shares: &[(&str, f64)]) -> Experiment {
    Experiment {
        name: "home".into(),
        salt: salt.into(),
        unit: Unit::User,
        enabled: true,
        variants: shares
            .iter()
            .map(|(n, s)| Variant {
                name: n.to_string(),
                share: *s,
                model_version: None,
                rerank: None,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::sample as exp;
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn assignment_is_stable_and_shares_hold_over_100k_ids() {
        let e = exp("s1", &[("control", 0.5), ("b", 0.3), ("c", 0.2)]);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for i in 0..100_000 {
            let id = format!("user-{i}");
            let v = &e.assign(&id).name;
            assert_eq!(&e.assign(&id).name, v, "the same id gets the same variant");
            *counts.entry(v.as_str()).or_default() += 1;
        }
        for (name, share) in [("control", 0.5), ("b", 0.3), ("c", 0.2)] {
            let got = counts[name] as f64 / 100_000.0;
            assert!((got - share).abs() < 0.02, "{name}: {got} vs {share}");
        }
        // The fixed hash makes the assignment the same on every machine and release: a
        // change to it would move users between variants mid-experiment.
        assert_eq!(position("s1", "user-0"), 0.7515532906443237);
        assert_eq!(position("s1", "user-1"), 0.8610756490568549);
        assert_eq!(position("home", "u:alice"), 0.4223753943057066);
        let golden = [
            ("user-0", "b"),
            ("user-1", "c"),
            ("user-2", "control"),
            ("user-3", "b"),
            ("user-4", "control"),
            ("user-7", "c"),
        ];
        for (id, variant) in golden {
            assert_eq!(e.assign(id).name, variant, "{id}");
        }
    }

    #[test]
    fn a_different_salt_assigns_independently() {
        let a = exp("salt-a", &[("x", 0.5), ("y", 0.5)]);
        let b = exp("salt-b", &[("x", 0.5), ("y", 0.5)]);
        let n = 100_000;
        let mut both_x = 0;
        let mut a_x = 0;
        let mut b_x = 0;
        for i in 0..n {
            let id = format!("u{i}");
            let ax = a.assign(&id).name == "x";
            let bx = b.assign(&id).name == "x";
            a_x += ax as usize;
            b_x += bx as usize;
            both_x += (ax && bx) as usize;
        }
        // Independent: P(x in both) = P(x in a) * P(x in b) = 0.25, not 0.5 (same) or 0.
        let joint = both_x as f64 / n as f64;
        let product = (a_x as f64 / n as f64) * (b_x as f64 / n as f64);
        assert!((joint - product).abs() < 0.01, "{joint} vs {product}");
    }

    #[test]
    fn validation_names_the_field() {
        let bad_sum = exp("s", &[("a", 0.5), ("b", 0.4)]);
        let err = validate(&[bad_sum]).unwrap_err().to_string();
        assert!(
            err.contains("experiments[0].variants") && err.contains("0.9"),
            "{err}"
        );

        let dup = exp("s", &[("a", 0.5), ("a", 0.5)]);
        let err = validate(&[dup]).unwrap_err().to_string();
        assert!(err.contains("variants[1].name"), "{err}");

        let mut two = exp("s", &[("a", 1.0)]);
        two.name = "other".into();
        let err = validate(&[exp("s", &[("a", 1.0)]), two])
            .unwrap_err()
            .to_string();
        assert!(err.contains("experiments[1].enabled"), "{err}");

        let negative = exp("s", &[("a", -0.5), ("b", 1.5)]);
        let err = validate(&[negative]).unwrap_err().to_string();
        assert!(err.contains("variants[0].share"), "{err}");

        let mut no_salt = exp("", &[("a", 1.0)]);
        no_salt.salt.clear();
        assert!(validate(&[no_salt])
            .unwrap_err()
            .to_string()
            .contains("salt"));

        assert!(validate(&[exp("s", &[("a", 0.7), ("b", 0.3)])]).is_ok());
    }
}
