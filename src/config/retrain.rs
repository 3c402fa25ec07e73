//! `[retrain]`: the offline loop (`crate::retrain`): how often the server retrains, which
//! events it gathers, which slice it holds out, and what the gate asks of a candidate.

use super::ConfigError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What happens to a candidate that passes the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Promote {
    /// Embed the catalog with it and switch to it (as `tandem models activate`).
    #[default]
    Activate,
    /// Build its collection and start an A/B test with it as the challenger at
    /// `experiment_share` of the traffic.
    Experiment,
    /// Register it and leave it for a person to activate.
    RegisterOnly,
}

impl Promote {
    pub fn as_str(self) -> &'static str {
        match self {
            Promote::Activate => "activate",
            Promote::Experiment => "experiment",
            Promote::RegisterOnly => "register-only",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrainSettings {
    /// How often the server runs the loop by itself, e.g. "24h" or "7d"; "off" (the default)
    /// runs it only when asked (`tandem retrain`, `POST /admin/retrain`, the admin page).
    pub every: String,
    /// How far back events are gathered, counted from the newest one, e.g. "90d".
    pub window: String,
    /// The most recent slice, held out as this run's test set and never trained on, e.g. "1d".
    pub holdout: String,
    /// The metric the gate compares (a key of `tandem eval`: recall@20, ndcg@10,
    /// newuser_recall@20, cold_recall@20).
    pub metric: String,
    /// How much better the candidate must be on `metric`, relative: 0.02 asks for 2% more
    /// than the active model. The candidate must be strictly better in any case.
    pub margin: f64,
    /// activate | experiment | register-only.
    pub promote: Promote,
    /// The challenger's share of the traffic when `promote = "experiment"`.
    pub experiment_share: f64,
    /// Fewer gathered training rows than this fail the run (nothing to learn from).
    pub min_rows: usize,
    /// Overrides the active model's epochs (with validation: the most the fit may run); 0
    /// keeps the manifest's.
    pub epochs: usize,
    /// Choose the epoch count and the popularity prior on a validation slice, as
    /// `tandem train` does.
    pub validate: bool,
    /// Runs (reports) the registry keeps.
    pub keep_runs: usize,
    /// How long a promotion may take (the catalog's embedding) before the run gives up
    /// waiting and records it as failed; the active model keeps serving.
    pub promote_timeout_secs: u64,
}

impl Default for RetrainSettings {
    fn default() -> Self {
        RetrainSettings {
            every: "off".into(),
            window: "90d".into(),
            holdout: "1d".into(),
            metric: "recall@20".into(),
            margin: 0.01,
            promote: Promote::Activate,
            experiment_share: 0.1,
            min_rows: 100,
            epochs: 0,
            validate: true,
            keep_runs: 50,
            promote_timeout_secs: 3600,
        }
    }
}

/// The metrics the gate may compare.
pub const GATE_METRICS: [&str; 4] = [
    "recall@20",
    "ndcg@10",
    "newuser_recall@20",
    "cold_recall@20",
];

impl RetrainSettings {
    /// The schedule's period; `None` when off.
    pub fn every(&self) -> Option<Duration> {
        match self.every.trim() {
            "" | "off" | "0" => None,
            s => parse_duration(s).ok(),
        }
    }

    pub fn window(&self) -> Duration {
        parse_duration(&self.window).unwrap_or(Duration::from_secs(90 * 86_400))
    }

    pub fn holdout(&self) -> Duration {
        parse_duration(&self.holdout).unwrap_or(Duration::from_secs(86_400))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            field: format!("retrain.{field}"),
            reason,
        };
        if !matches!(self.every.trim(), "" | "off" | "0") {
            let d = parse_duration(&self.every).map_err(|r| invalid("every", r))?;
            if d < Duration::from_secs(60) {
                return Err(invalid("every", "must be at least 1m (or \"off\")".into()));
            }
        }
        let window = parse_duration(&self.window).map_err(|r| invalid("window", r))?;
        let holdout = parse_duration(&self.holdout).map_err(|r| invalid("holdout", r))?;
        if holdout.is_zero() || holdout >= window {
            return Err(invalid(
                "holdout",
                format!(
                    "{:?} must be more than 0 and shorter than the window ({:?})",
                    self.holdout, self.window
                ),
            ));
        }
        if !GATE_METRICS.contains(&self.metric.as_str()) {
            return Err(invalid(
                "metric",
                format!(
                    "{:?} is not one of {}",
                    self.metric,
                    GATE_METRICS.join(", ")
                ),
            ));
        }
        if !(self.margin.is_finite() && self.margin >= 0.0) {
            return Err(invalid("margin", "must be a number at least 0".into()));
        }
        if !(self.experiment_share > 0.0 && self.experiment_share < 1.0) {
            return Err(invalid(
                "experiment_share",
                "must be between 0 and 1 (exclusive)".into(),
            ));
        }
        if self.keep_runs == 0 {
            return Err(invalid("keep_runs", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// "90d", "24h", "30m", "45s" (or several: "1d12h"). Bare numbers are seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty; expected a duration such as 24h, 7d or 30m".into());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {c:?}; use s, m, h, d or w (e.g. 24h, 7d)"
                ))
            }
        };
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{s:?}: a number must come before {c:?}"))?;
        total = total.saturating_add(n.saturating_mul(unit));
        number.clear();
    }
    if !number.is_empty() {
        return Err(format!("{s:?}: {number} has no unit (s, m, h, d or w)"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bad_ones_name_the_problem() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(
            parse_duration("1d12h").unwrap(),
            Duration::from_secs(129_600)
        );
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("3 days")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("12").is_ok());
        assert!(parse_duration("h").unwrap_err().contains("number"));
    }

    #[test]
    fn the_schedule_is_off_by_default_and_settings_are_checked() {
        let s = RetrainSettings::default();
        assert_eq!(s.every(), None);
        s.validate().unwrap();
        let bad = RetrainSettings {
            holdout: "100d".into(),
            ..RetrainSettings::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("retrain.holdout"));
        let bad = RetrainSettings {
            metric: "auc".into(),
            ..RetrainSettings::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("retrain.metric"));
        let on = RetrainSettings {
            every: "24h".into(),
            ..RetrainSettings::default()
        };
        assert_eq!(on.every(), Some(Duration::from_secs(86_400)));
    }
}
