//! `Settings`: read from an optional TOML file, then overridden by `TANDEM_*` environment
//! variables, and validated once at start-up so that deeper code can trust them.
//!
//! Environment variables use `__` between section and key: `TANDEM_INDEX__BACKEND=qdrant`,
//! `TANDEM_SESSION__REDIS_URL=redis://..`. Top-level keys are plain: `TANDEM_DATA_DIR`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {file}: {reason}")]
    File { file: PathBuf, reason: String },
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("setting `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IndexBackend {
    /// qdrant-edge, in-process, persisted under the data dir.
    #[default]
    #[serde(alias = "edge")]
    Embedded,
    /// A Qdrant server or cluster over gRPC.
    Qdrant,
    /// Brute-force exact search in memory.
    Exact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SessionBackend {
    /// In-process store with a durable append-only event log file.
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where collections, the event log and registered models live.
    pub data_dir: PathBuf,
    /// Address the HTTP server binds.
    pub bind: String,
    /// The checkpoint directory served at start-up.
    pub model_path: PathBuf,
    pub index: IndexSettings,
    pub session: SessionSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexSettings {
    pub backend: IndexBackend,
    /// gRPC URL of the Qdrant server (backend = qdrant).
    pub qdrant_url: String,
    /// Collection name prefix on the Qdrant server.
    pub collection: String,
    pub shard_number: u32,
    pub replication_factor: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    pub backend: SessionBackend,
    pub redis_url: String,
    /// Prefix of every Redis key, one per deployment.
    pub key_prefix: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("data"),
            bind: "0.0.0.0:8080".into(),
            model_path: PathBuf::from("models/demo"),
            index: IndexSettings::default(),
            session: SessionSettings::default(),
        }
    }
}

impl Default for IndexSettings {
    fn default() -> Self {
        IndexSettings {
            backend: IndexBackend::Embedded,
            qdrant_url: "http://127.0.0.1:6334".into(),
            collection: "tandem_items".into(),
            shard_number: 1,
            replication_factor: 1,
        }
    }
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            backend: SessionBackend::Memory,
            redis_url: "redis://127.0.0.1:6379".into(),
            key_prefix: "tandem".into(),
        }
    }
}

impl Settings {
    /// Loads the file (if given), then applies `TANDEM_*` variables from the process
    /// environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`], with the environment passed in (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut doc = match file {
            Some(f) => {
                let text = std::fs::read_to_string(f).map_err(|e| ConfigError::File {
                    file: f.to_path_buf(),
                    reason: e.to_string(),
                })?;
                text.parse::<toml::Table>().map_err(|e| ConfigError::File {
                    file: f.to_path_buf(),
                    reason: e.to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        for (var, value) in env {
            let Some(key) = var.strip_prefix("TANDEM_") else {
                continue;
            };
            let path: Vec<String> = key
                .to_ascii_lowercase()
                .split("__")
                .map(String::from)
                .collect();
            if !Self::is_known_key(&path) {
                continue; // other TANDEM_* variables (TANDEM_ADMIN_KEY, TANDEM_LOG_FORMAT) are not settings
            }
            set_path(&mut doc, &path, &value);
        }
        let settings: Settings =
            toml::Value::Table(doc)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    field: "config".into(),
                    reason: e.message().to_string(),
                })?;
        settings.validate()?;
        Ok(settings)
    }

    fn is_known_key(path: &[String]) -> bool {
        let defaults = toml::Value::try_from(Settings::default()).expect("settings serialize");
        let mut v = &defaults;
        for p in path {
            match v.get(p) {
                Some(next) => v = next,
                None => return false,
            }
        }
        !v.is_table()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            field: field.into(),
            reason,
        };
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty".into()));
        }
        self.bind
            .parse::<std::net::SocketAddr>()
            .map_err(|e| invalid("bind", format!("{:?} is not host:port ({e})", self.bind)))?;
        if self.index.backend == IndexBackend::Qdrant && !self.index.qdrant_url.starts_with("http")
        {
            return Err(invalid(
                "index.qdrant_url",
                format!(
                    "{:?} must start with http:// or https://",
                    self.index.qdrant_url
                ),
            ));
        }
        if self.index.shard_number == 0 || self.index.replication_factor == 0 {
            return Err(invalid(
                "index.shard_number",
                "shard_number and replication_factor must be at least 1".into(),
            ));
        }
        if self.session.backend == SessionBackend::Redis
            && !self.session.redis_url.starts_with("redis")
        {
            return Err(invalid(
                "session.redis_url",
                format!(
                    "{:?} must start with redis:// or rediss://",
                    self.session.redis_url
                ),
            ));
        }
        Ok(())
    }
}

/// Sets `doc[path...] = value`, parsing the value as TOML (number, bool) when it can, else as
/// a string.
fn set_path(doc: &mut toml::Table, path: &[String], value: &str) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut table = doc;
    for p in parents {
        table = table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("settings sections are tables");
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table() && !v.is_array())
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    table.insert(last.clone(), parsed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tandem.toml");
        std::fs::write(
            &f,
            "bind = \"127.0.0.1:9000\"\n[index]\nbackend = \"qdrant\"\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&f),
            env(&[
                ("TANDEM_SESSION__BACKEND", "redis"),
                ("TANDEM_INDEX__SHARD_NUMBER", "3"),
                ("TANDEM_ADMIN_KEY", "not-a-setting"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(s.bind, "127.0.0.1:9000");
        assert_eq!(s.index.backend, IndexBackend::Qdrant);
        assert_eq!(s.index.shard_number, 3);
        assert_eq!(s.session.backend, SessionBackend::Redis);
    }

    #[test]
    fn bad_settings_name_the_field() {
        let err = Settings::load_from(None, env(&[("TANDEM_BIND", "nope")])).unwrap_err();
        assert!(err.to_string().contains("`bind`"), "{err}");
        let err =
            Settings::load_from(None, env(&[("TANDEM_INDEX__BACKEND", "faiss")])).unwrap_err();
        assert!(err.to_string().contains("faiss"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(&f, "bindd = 1\n").unwrap();
        let err = Settings::load_from(Some(&f), env(&[])).unwrap_err();
        assert!(err.to_string().contains("bindd"), "{err}");
    }
}
