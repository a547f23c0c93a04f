//! `evdb serve` settings: one [`ServeConfig`], resolved from flags, then
//! `EVDB_*` environment variables, then the TOML file of `--config`, then
//! defaults (contract §1). The TOML keys are the flag names with `_`.

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

/// The `[limits]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub event_size_max: Option<usize>,
    pub batch_events_max: Option<usize>,
    pub batch_size_max: Option<usize>,
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
    /// Not supported yet: refused at start rather than silently ignored.
    pub auth: Option<toml::Value>,
    pub tls: Option<toml::Value>,
    pub rate_limit: Option<toml::Value>,
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
        for (name, present) in [
            ("[auth]", file.auth.is_some()),
            ("[tls]", file.tls.is_some()),
            ("[rate_limit]", file.rate_limit.is_some()),
        ] {
            if present {
                return Err(invalid(
                    name,
                    "this build does not support the section yet; remove it rather than run without it",
                ));
            }
        }
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
        if let Some(l) = file.limits {
            limits.event_size_max = l.event_size_max.unwrap_or(limits.event_size_max);
            limits.batch_events_max = l.batch_events_max.unwrap_or(limits.batch_events_max);
            limits.batch_size_max = l.batch_size_max.unwrap_or(limits.batch_size_max);
        }
        if limits.batch_events_max == 0 || limits.batch_size_max == 0 || limits.event_size_max == 0
        {
            return Err(invalid("limits", "every limit must be at least 1"));
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
        };
        config.check_listen()?;
        Ok(config)
    }

    /// Without authentication configured, only loopback may listen unless
    /// `--insecure-listen` says otherwise (contract §7).
    fn check_listen(&self) -> Result<(), ConfigError> {
        for (setting, addr) in [("http", self.http), ("grpc", self.grpc)] {
            if !addr.ip().is_loopback() && !self.insecure_listen {
                return Err(invalid(
                    setting,
                    format!(
                        "{addr} is not a loopback address and no auth tokens are configured; \
                         pass --insecure-listen to serve it anyway"
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
    fn refuses_what_it_cannot_honour() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evdb.toml");
        std::fs::write(&path, "[tls]\ncert = \"a.pem\"\n").unwrap();
        let err = ServeConfig::resolve(ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("[tls]"), "{err}");
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
}
