//! `evdb serve` settings: one [`ServeConfig`], resolved from flags, then
//! `EVDB_*` environment variables, then the TOML file of `--config`, then
//! defaults (contract §1). The TOML keys are the flag names with `_`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::limits::Limits;
use crate::storage::FsyncMode;

pub const DEFAULT_DATA_DIR: &str = "./evdb-data";
pub const DEFAULT_HTTP: &str = "127.0.0.1:8000";
pub const DEFAULT_GRPC: &str = "127.0.0.1:50051";

/// Errors in settings: always name the setting and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{setting}: {message}")]
    Invalid { setting: String, message: String },
}

fn invalid(setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.to_owned(),
        message: message.into(),
    }
}

/// A token's role (contract §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Writes events only.
    Ingest,
    /// Query, stats, tail, metrics.
    Read,
    /// Everything.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }
}

/// One configured token, resolved: its SHA-256 digest, never the text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenConfig {
    pub name: String,
    pub sha256: [u8; 32],
    pub role: Role,
    /// An ingest token may only write these sources (None: any).
    pub sources: Option<Vec<String>>,
}

/// `[[auth.tokens]]` as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    pub name: String,
    pub sha256: Option<String>,
    pub token: Option<String>,
    pub role: String,
    pub sources: Option<Vec<String>>,
}

/// The `[auth]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    #[serde(default)]
    pub tokens: Vec<TokenFile>,
}

fn resolve_tokens(file: &AuthFile) -> Result<Vec<TokenConfig>, ConfigError> {
    let mut out = Vec::new();
    for (i, t) in file.tokens.iter().enumerate() {
        let setting = format!("auth.tokens[{i}] ({:?})", t.name);
        let role = match t.role.as_str() {
            "ingest" => Role::Ingest,
            "read" => Role::Read,
            "admin" => Role::Admin,
            other => {
                return Err(invalid(
                    &setting,
                    format!("role {other:?}: use ingest, read or admin"),
                ));
            }
        };
        let sha256 = match (&t.sha256, &t.token) {
            (Some(hex_digest), None) => {
                let bytes = hex::decode(hex_digest.trim())
                    .map_err(|e| invalid(&setting, format!("sha256 is not hex: {e}")))?;
                <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| invalid(&setting, "sha256 must be 64 hex digits (32 bytes)"))?
            }
            (None, Some(plain)) => {
                if plain.is_empty() {
                    return Err(invalid(&setting, "token must not be empty"));
                }
                tracing::warn!(
                    "{setting}: the token is stored in plain text in the config file; \
                     prefer sha256 = \"{}\"",
                    hex::encode(crate::api::auth::sha256(plain))
                );
                crate::api::auth::sha256(plain)
            }
            _ => {
                return Err(invalid(
                    &setting,
                    "give exactly one of sha256 (hex of the token's SHA-256) or token",
                ));
            }
        };
        if t.sources.is_some() && role != Role::Ingest {
            return Err(invalid(&setting, "sources only applies to ingest tokens"));
        }
        out.push(TokenConfig {
            name: t.name.clone(),
            sha256,
            role,
            sources: t.sources.clone(),
        });
    }
    Ok(out)
}

/// The `[tls]` table (paths relative to the config file's directory).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The `[retention]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionFile {
    /// Events older than this go: `30d`, `12h`, `90m`, `3600s`.
    pub max_age: Option<String>,
    /// The oldest segments go while the store takes more: `10GiB`, `500MB`.
    pub max_bytes: Option<ByteSize>,
    /// How often the daemon applies it (default `60s`).
    pub check_interval: Option<String>,
    /// Per-source maximum age, overriding `max_age` (shorter or longer).
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

/// Resolved `[retention]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    pub policy: crate::maintenance::RetentionPolicy,
    pub check_interval: std::time::Duration,
}

/// The `[compaction]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactionFile {
    /// Rewrite a segment once this fraction of its rows is deleted (0.2).
    pub deleted_ratio: Option<f64>,
    /// Deleted events' bytes are gone within this (`24h`).
    pub deleted_max_age: Option<String>,
    /// Merge segments smaller than this (`16MiB`).
    pub small_segment_bytes: Option<ByteSize>,
    /// Merged segments grow up to this (`128MiB`).
    pub max_segment_bytes: Option<ByteSize>,
    /// Read at most this many bytes per second (`0`: no limit).
    pub io_limit: Option<ByteSize>,
    /// Runs of segments rewritten at once (the number of cores).
    pub threads: Option<usize>,
    /// How often the daemon looks for work (`60s`).
    pub check_interval: Option<String>,
    /// `false` turns background compaction off (`evdb compact` still works).
    pub enabled: Option<bool>,
}

/// Resolved `[compaction]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Compaction {
    pub policy: crate::maintenance::CompactionPolicy,
    pub check_interval: std::time::Duration,
    pub enabled: bool,
}

/// The `[storage]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageFile {
    /// Below this much free space on the data directory's file system the
    /// store refuses writes (`256MiB`; `0` turns the floor off).
    pub min_free_bytes: Option<ByteSize>,
}

/// A size in bytes: a number, or a string such as `512MiB`, `10GB`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    pub fn resolve(&self, setting: &str) -> Result<u64, ConfigError> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(t) => parse_bytes(setting, t),
        }
    }
}

/// `1024`, `64KiB`, `512MiB`, `10GiB`, `1TiB`, `500MB`, `10GB` (KB/MB/GB/TB
/// are powers of 1000).
pub fn parse_bytes(setting: &str, text: &str) -> Result<u64, ConfigError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        invalid(
            setting,
            format!(
                "{text:?}: use a number of bytes, or a number and KiB, MiB, GiB, TiB, KB, MB, GB or TB"
            ),
        )
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(bad)
}

/// Resolves `[retention]`.
pub fn resolve_retention(r: &RetentionFile) -> Result<Retention, ConfigError> {
    let max_age = r
        .max_age
        .as_deref()
        .map(|t| parse_duration("retention.max_age", t))
        .transpose()?;
    let max_bytes = r
        .max_bytes
        .as_ref()
        .map(|b| b.resolve("retention.max_bytes"))
        .transpose()?;
    if max_bytes == Some(0) {
        return Err(invalid("retention.max_bytes", "must be more than 0"));
    }
    let mut sources = BTreeMap::new();
    for (source, age) in &r.sources {
        sources.insert(
            source.clone(),
            parse_duration(&format!("retention.sources.{source}"), age)?,
        );
    }
    if max_age.is_none() && max_bytes.is_none() && sources.is_empty() {
        return Err(invalid(
            "retention",
            "set max_age, max_bytes or sources (or leave the table out)",
        ));
    }
    Ok(Retention {
        policy: crate::maintenance::RetentionPolicy {
            max_age,
            max_bytes,
            sources,
        },
        check_interval: match &r.check_interval {
            Some(t) => parse_duration("retention.check_interval", t)?,
            None => std::time::Duration::from_secs(60),
        },
    })
}

/// Resolves `[compaction]` (defaults when absent).
pub fn resolve_compaction(c: &CompactionFile) -> Result<Compaction, ConfigError> {
    let mut policy = crate::maintenance::CompactionPolicy::default();
    if let Some(r) = c.deleted_ratio {
        if !(r > 0.0 && r <= 1.0) {
            return Err(invalid(
                "compaction.deleted_ratio",
                "must be more than 0 and at most 1",
            ));
        }
        policy.deleted_ratio = r;
    }
    if let Some(t) = &c.deleted_max_age {
        policy.deleted_max_age = parse_duration("compaction.deleted_max_age", t)?;
    }
    if let Some(b) = &c.small_segment_bytes {
        policy.small_segment_bytes = b.resolve("compaction.small_segment_bytes")?;
    }
    if let Some(b) = &c.max_segment_bytes {
        policy.max_segment_bytes = b.resolve("compaction.max_segment_bytes")?;
        if policy.max_segment_bytes == 0 {
            return Err(invalid(
                "compaction.max_segment_bytes",
                "must be more than 0",
            ));
        }
    }
    if let Some(b) = &c.io_limit {
        policy.io_bytes_per_sec = b.resolve("compaction.io_limit")?;
    }
    if let Some(n) = c.threads {
        if !(1..=64).contains(&n) {
            return Err(invalid("compaction.threads", "must be 1 to 64"));
        }
        policy.threads = n;
    }
    Ok(Compaction {
        policy,
        check_interval: match &c.check_interval {
            Some(t) => parse_duration("compaction.check_interval", t)?,
            None => std::time::Duration::from_secs(60),
        },
        enabled: c.enabled.unwrap_or(true),
    })
}

/// The default free-space floor.
pub const MIN_FREE_BYTES_DEFAULT: u64 = 256 << 20;

/// `30d`, `12h`, `90m`, `3600s`, `250ms`.
pub fn parse_duration(setting: &str, text: &str) -> Result<std::time::Duration, ConfigError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| {
        invalid(
            setting,
            format!("{text:?}: use a number and d, h, m, s or ms"),
        )
    })?;
    let d = match unit {
        "d" => std::time::Duration::from_secs(n.saturating_mul(86_400)),
        "h" => std::time::Duration::from_secs(n.saturating_mul(3_600)),
        "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "s" => std::time::Duration::from_secs(n),
        "ms" => std::time::Duration::from_millis(n),
        _ => {
            return Err(invalid(
                setting,
                format!("{text:?}: use a number and d, h, m, s or ms"),
            ));
        }
    };
    if d.is_zero() {
        return Err(invalid(setting, "must be more than 0"));
    }
    Ok(d)
}

/// `[rate_limit.sources.NAME]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRateFile {
    pub events_per_s: f64,
    /// Default: twice `events_per_s`.
    pub burst: Option<f64>,
}

/// The `[rate_limit]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    /// Default 1,000 (seed 002).
    pub events_per_s: Option<f64>,
    /// Default 2,000 (seed 002).
    pub burst: Option<f64>,
    #[serde(default)]
    pub sources: std::collections::HashMap<String, SourceRateFile>,
}

fn resolve_rate_limit(
    file: &RateLimitFile,
) -> Result<crate::api::ratelimit::RateLimitConfig, ConfigError> {
    use crate::api::ratelimit::{Rate, RateLimitConfig};
    let check = |setting: String, per_s: f64, burst: f64| {
        if per_s.is_finite() && per_s > 0.0 && burst.is_finite() && burst >= 1.0 {
            Ok(Rate { per_s, burst })
        } else {
            Err(invalid(&setting, "events_per_s must be > 0 and burst >= 1"))
        }
    };
    let default = check(
        "rate_limit".into(),
        file.events_per_s.unwrap_or(1000.0),
        file.burst.unwrap_or(2000.0),
    )?;
    let mut sources = std::collections::HashMap::new();
    for (name, r) in &file.sources {
        let rate = check(
            format!("rate_limit.sources.{name}"),
            r.events_per_s,
            r.burst.unwrap_or(2.0 * r.events_per_s),
        )?;
        sources.insert(name.clone(), rate);
    }
    Ok(RateLimitConfig {
        default: Some(default),
        sources,
    })
}

/// The `[limits]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub event_size_max: Option<usize>,
    pub batch_events_max: Option<usize>,
    pub batch_size_max: Option<usize>,
    pub query_decode_max: Option<u64>,
    /// Open connections per listener (1024).
    pub max_connections: Option<usize>,
    /// Longest a request may take (`60s`).
    pub request_timeout: Option<String>,
    /// Queries, stats and aggregations at once (twice the cores, at least 4).
    pub max_concurrent_queries: Option<usize>,
}

/// The TOML file as written (every key optional).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub http: Option<String>,
    pub grpc: Option<String>,
    pub ephemeral: Option<bool>,
    pub ready_file: Option<PathBuf>,
    pub fsync: Option<String>,
    pub insecure_listen: Option<bool>,
    pub limits: Option<LimitsFile>,
    pub auth: Option<AuthFile>,
    pub rate_limit: Option<RateLimitFile>,
    pub tls: Option<TlsFile>,
    pub retention: Option<RetentionFile>,
    pub compaction: Option<CompactionFile>,
    pub storage: Option<StorageFile>,
    pub analytics: Option<AnalyticsFile>,
}

/// The `[analytics]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsFile {
    /// JSON pointers into `data` extracted at ingest as numeric columns.
    #[serde(default)]
    pub numeric_fields: Vec<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// What the command line (flags, which clap already merged with `EVDB_*`
/// variables) gave; `None`/`false` where neither did.
#[derive(Clone, Debug, Default)]
pub struct ServeArgs {
    pub data_dir: Option<PathBuf>,
    pub http: Option<String>,
    pub grpc: Option<String>,
    pub config: Option<PathBuf>,
    pub ephemeral: bool,
    pub ready_file: Option<PathBuf>,
    pub fsync: Option<String>,
    pub insecure_listen: bool,
    pub numeric_fields: Vec<String>,
}

/// Resolved settings of `evdb serve`.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub ephemeral: bool,
    pub ready_file: Option<PathBuf>,
    pub fsync: FsyncMode,
    pub insecure_listen: bool,
    pub limits: Limits,
    /// Connections, request deadline, concurrent queries.
    pub load: crate::api::load::LoadLimits,
    /// Bearer tokens; empty: no authentication (loopback only, unless
    /// `insecure_listen`).
    pub tokens: Vec<TokenConfig>,
    /// Per-source token buckets; None: no limit.
    pub rate_limit: Option<crate::api::ratelimit::RateLimitConfig>,
    /// TLS for both listeners; None: plaintext.
    pub tls: Option<crate::api::tls::TlsConfig>,
    /// Events older than this are removed; None: kept forever.
    pub retention: Option<Retention>,
    pub compaction: Compaction,
    /// The free-space floor (0: none).
    pub min_free_bytes: u64,
    /// Declared numeric fields (JSON pointers) for aggregations.
    pub numeric_fields: Vec<String>,
}

fn address(setting: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|e| invalid(setting, format!("{text:?} is not HOST:PORT ({e})")))?;
    addrs
        .next()
        .ok_or_else(|| invalid(setting, format!("{text:?} resolves to no address")))
}

impl ServeConfig {
    /// Flags (and env) win over the file, the file over defaults.
    pub fn resolve(args: ServeArgs) -> Result<ServeConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let base = args
            .config
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let tls = file.tls.as_ref().map(|t| crate::api::tls::TlsConfig {
            cert: base.join(&t.cert),
            key: base.join(&t.key),
            client_ca: t.client_ca.as_ref().map(|c| base.join(c)),
        });
        let http = args
            .http
            .or(file.http)
            .unwrap_or_else(|| DEFAULT_HTTP.to_owned());
        let grpc = args
            .grpc
            .or(file.grpc)
            .unwrap_or_else(|| DEFAULT_GRPC.to_owned());
        let fsync = args
            .fsync
            .or(file.fsync)
            .unwrap_or_else(|| "always".to_owned());
        let mut limits = Limits::default();
        let mut load = crate::api::load::LoadLimits::default();
        if let Some(l) = &file.limits {
            load.max_connections = l.max_connections.unwrap_or(load.max_connections);
            load.max_concurrent_queries = l
                .max_concurrent_queries
                .unwrap_or(load.max_concurrent_queries);
            if let Some(t) = &l.request_timeout {
                load.request_timeout = parse_duration("limits.request_timeout", t)?;
            }
            if load.max_connections == 0 {
                return Err(invalid("limits.max_connections", "must be at least 1"));
            }
            if load.max_concurrent_queries == 0 {
                return Err(invalid(
                    "limits.max_concurrent_queries",
                    "must be at least 1",
                ));
            }
        }
        if let Some(l) = file.limits {
            limits.event_size_max = l.event_size_max.unwrap_or(limits.event_size_max);
            limits.batch_events_max = l.batch_events_max.unwrap_or(limits.batch_events_max);
            limits.batch_size_max = l.batch_size_max.unwrap_or(limits.batch_size_max);
            limits.query_decode_max = l.query_decode_max.unwrap_or(limits.query_decode_max);
        }
        if limits.batch_events_max == 0 || limits.batch_size_max == 0 || limits.event_size_max == 0
        {
            return Err(invalid("limits", "every limit must be at least 1"));
        }
        let tokens = resolve_tokens(&file.auth.clone().unwrap_or_default())?;
        let rate_limit = file
            .rate_limit
            .as_ref()
            .map(resolve_rate_limit)
            .transpose()?;
        let retention = file.retention.as_ref().map(resolve_retention).transpose()?;
        let compaction = resolve_compaction(&file.compaction.clone().unwrap_or_default())?;
        let min_free_bytes = match file
            .storage
            .as_ref()
            .and_then(|s| s.min_free_bytes.as_ref())
        {
            Some(b) => b.resolve("storage.min_free_bytes")?,
            None => MIN_FREE_BYTES_DEFAULT,
        };
        let numeric_fields = if args.numeric_fields.is_empty() {
            file.analytics.map(|a| a.numeric_fields).unwrap_or_default()
        } else {
            args.numeric_fields
        };
        let mut seen = std::collections::HashSet::new();
        for pointer in &numeric_fields {
            crate::index::numeric::check_pointer(pointer)
                .map_err(|e| invalid("analytics.numeric_fields", e))?;
            if !seen.insert(pointer) {
                return Err(invalid(
                    "analytics.numeric_fields",
                    format!("{pointer:?} is declared twice"),
                ));
            }
        }
        let config = ServeConfig {
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            http: address("http", &http)?,
            grpc: address("grpc", &grpc)?,
            ephemeral: args.ephemeral || file.ephemeral.unwrap_or(false),
            ready_file: args.ready_file.or(file.ready_file),
            fsync: FsyncMode::parse(&fsync).map_err(|e| invalid("fsync", e))?,
            insecure_listen: args.insecure_listen || file.insecure_listen.unwrap_or(false),
            limits,
            load,
            tokens,
            rate_limit,
            tls,
            retention,
            compaction,
            min_free_bytes,
            numeric_fields,
        };
        config.check_listen()?;
        Ok(config)
    }

    /// Without authentication configured, only loopback may listen unless
    /// `--insecure-listen` says otherwise (contract §7); then a warning says
    /// so at start.
    fn check_listen(&self) -> Result<(), ConfigError> {
        for (setting, addr) in [("http", self.http), ("grpc", self.grpc)] {
            let mtls = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
            if addr.ip().is_loopback() || !self.tokens.is_empty() || mtls {
                continue;
            }
            if self.insecure_listen {
                tracing::warn!(
                    "{setting} listens on {addr} without authentication (--insecure-listen): \
                     anyone who can reach it may read, write and delete events"
                );
                eprintln!(
                    "evdb: warning: {setting} listens on {addr} without authentication (--insecure-listen)"
                );
            } else {
                return Err(invalid(
                    setting,
                    format!(
                        "{addr} is not a loopback address and no auth tokens are configured; \
                         configure [[auth.tokens]] or pass --insecure-listen to serve it anyway"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evdb.toml");
        std::fs::write(
            &path,
            "data_dir = \"/tmp/x\"\nhttp = \"127.0.0.1:9\"\nfsync = \"never\"\n[limits]\nbatch_events_max = 5\n",
        )
        .unwrap();
        let c = ServeConfig::resolve(ServeArgs {
            http: Some("127.0.0.1:0".into()),
            config: Some(path),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(c.http.port(), 0);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.fsync, FsyncMode::Never);
        assert_eq!(c.grpc.port(), 50051);
        assert_eq!(c.limits.batch_events_max, 5);
    }

    #[test]
    fn tokens_allow_other_interfaces_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evdb.toml");
        let digest = "ab".repeat(32);
        std::fs::write(
            &path,
            format!("http = \"0.0.0.0:0\"\n[[auth.tokens]]\nname = \"a\"\nsha256 = \"{digest}\"\nrole = \"read\"\n"),
        )
        .unwrap();
        let c = ServeConfig::resolve(ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(c.tokens.len(), 1);
        assert_eq!(c.tokens[0].role, Role::Read);
        for bad in [
            "[[auth.tokens]]\nname = \"a\"\ntoken = \"t\"\nrole = \"root\"\n",
            "[[auth.tokens]]\nname = \"a\"\nsha256 = \"zz\"\nrole = \"read\"\n",
            "[[auth.tokens]]\nname = \"a\"\nrole = \"read\"\n",
            "[[auth.tokens]]\nname = \"a\"\ntoken = \"t\"\nrole = \"read\"\nsources = [\"x\"]\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            let err = ServeConfig::resolve(ServeArgs {
                config: Some(path.clone()),
                ..ServeArgs::default()
            })
            .unwrap_err();
            assert!(err.to_string().contains("auth.tokens[0]"), "{err}");
        }
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(
            parse_duration("x", "30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            parse_duration("x", "12h").unwrap(),
            Duration::from_secs(12 * 3_600)
        );
        assert_eq!(
            parse_duration("x", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        for bad in ["", "d", "10", "10y", "0s", "-1d"] {
            assert!(parse_duration("x", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/evdb.toml");
        let c = ServeConfig::resolve(ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(c.tokens.len(), 3);
        assert!(c.rate_limit.is_some());
        assert!(!c.http.ip().is_loopback());
        assert_eq!(c.numeric_fields, ["/latency_ms"]);
        assert_eq!(c.retention.unwrap().policy.max_bytes, Some(20 << 30));
        assert_eq!(c.min_free_bytes, 1 << 30);
    }

    #[test]
    fn numeric_fields_are_checked_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evdb.toml");
        let resolve = |text: &str, flags: &[&str]| {
            std::fs::write(&path, text).unwrap();
            ServeConfig::resolve(ServeArgs {
                config: Some(path.clone()),
                numeric_fields: flags.iter().map(|f| (*f).to_owned()).collect(),
                ..ServeArgs::default()
            })
        };
        let c = resolve("[analytics]\nnumeric_fields = [\"/a\", \"/b/c\"]\n", &[]).unwrap();
        assert_eq!(c.numeric_fields, ["/a", "/b/c"]);
        let c = resolve("[analytics]\nnumeric_fields = [\"/a\"]\n", &["/x"]).unwrap();
        assert_eq!(c.numeric_fields, ["/x"]);
        for bad in [
            "[analytics]\nnumeric_fields = [\"latency\"]\n",
            "[analytics]\nnumeric_fields = [\"/a\", \"/a\"]\n",
            "[analytics]\nfields = [\"/a\"]\n",
        ] {
            let err = resolve(bad, &[]).unwrap_err().to_string();
            assert!(
                err.contains("analytics") || err.contains("unknown field"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evdb.toml");
        std::fs::write(&path, "[tls]\ncert = \"a.pem\"\n").unwrap();
        let err = ServeConfig::resolve(ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("key"), "{err}");
        std::fs::write(&path, "htp = \"x\"\n").unwrap();
        let err = ServeConfig::resolve(ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("htp"), "{err}");
        let err = ServeConfig::resolve(ServeArgs {
            http: Some("0.0.0.0:8000".into()),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("--insecure-listen"), "{err}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("x", "1024").unwrap(), 1024);
        assert_eq!(parse_bytes("x", "64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_bytes("x", "10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_bytes("x", "500MB").unwrap(), 500_000_000);
        for bad in ["", "MiB", "10 parsecs", "-1GiB", "99999999999TiB"] {
            assert!(parse_bytes("x", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retention_compaction_and_the_floor() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evdb.toml");
        let resolve = |text: &str| {
            std::fs::write(&path, text).unwrap();
            ServeConfig::resolve(ServeArgs {
                config: Some(path.clone()),
                ..ServeArgs::default()
            })
        };
        let c = resolve("").unwrap();
        assert_eq!(c.retention, None);
        assert_eq!(
            c.compaction.policy,
            crate::maintenance::CompactionPolicy::default()
        );
        assert!(c.compaction.enabled);
        assert_eq!(c.min_free_bytes, MIN_FREE_BYTES_DEFAULT);
        let c = resolve(
            "[retention]\nmax_bytes = \"2GiB\"\n[retention.sources]\naudit = \"365d\"\n\
             [compaction]\ndeleted_ratio = 0.5\ndeleted_max_age = \"1h\"\nio_limit = \"64MiB\"\nthreads = 1\nenabled = false\n\
             [storage]\nmin_free_bytes = 0\n",
        )
        .unwrap();
        let r = c.retention.unwrap();
        assert_eq!(r.policy.max_age, None);
        assert_eq!(r.policy.max_bytes, Some(2 << 30));
        assert_eq!(r.policy.sources["audit"], Duration::from_secs(365 * 86_400));
        assert_eq!(c.compaction.policy.deleted_ratio, 0.5);
        assert_eq!(
            c.compaction.policy.deleted_max_age,
            Duration::from_secs(3600)
        );
        assert_eq!(c.compaction.policy.io_bytes_per_sec, 64 << 20);
        assert_eq!(c.compaction.policy.threads, 1);
        assert!(!c.compaction.enabled);
        assert_eq!(c.min_free_bytes, 0);
        for (bad, names) in [
            ("[retention]\n", "retention"),
            ("[retention]\nmax_bytes = \"lots\"\n", "retention.max_bytes"),
            (
                "[retention.sources]\naudit = \"forever\"\n",
                "retention.sources.audit",
            ),
            (
                "[compaction]\ndeleted_ratio = 0\n",
                "compaction.deleted_ratio",
            ),
            (
                "[compaction]\nmax_segment_bytes = 0\n",
                "compaction.max_segment_bytes",
            ),
            ("[storage]\nmin_free = 1\n", "min_free"),
        ] {
            let err = resolve(bad).unwrap_err().to_string();
            assert!(err.contains(names), "{bad}: {err}");
        }
    }
}
