//! Bearer-token authentication and role checks, shared by HTTP and gRPC
//! (contract §7). Tokens are kept as SHA-256 digests and compared in
//! constant time against every configured token.

use sha2::{Digest, Sha256};

use crate::config::{Role, TokenConfig};

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Open to everyone (health checks).
    Nothing,
    /// Writes events.
    Ingest,
    /// Reads events, stats, tails, metrics.
    Read,
    /// Everything, deletes and snapshots included.
    Admin,
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// An ingest token may only write these sources (None: any).
    pub sources: Option<Vec<String>>,
}

impl Principal {
    /// Whether it may write events of `source`.
    pub fn may_write(&self, source: &str) -> bool {
        self.sources
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|s| s == source))
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send Authorization: Bearer <token>")]
    Missing,
    #[error("the bearer token is not valid")]
    Invalid,
    #[error("the token {token:?} has role {role} and may not {what}")]
    Forbidden {
        token: String,
        role: &'static str,
        what: &'static str,
    },
    #[error("the token {token:?} may not write events of source_system {source_system:?}")]
    Source {
        token: String,
        source_system: String,
    },
}

/// The configured tokens.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    tokens: Vec<TokenConfig>,
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}

pub fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Auth {
    pub fn new(tokens: Vec<TokenConfig>) -> Auth {
        Auth { tokens }
    }

    /// Whether any token is configured (otherwise everything is open).
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The caller of a request with this `Authorization` header value, if
    /// it may do what `need` says. `Ok(None)`: open access (no tokens
    /// configured, or nothing needed).
    pub fn check(&self, header: Option<&str>, need: Need) -> Result<Option<Principal>, AuthError> {
        if !self.enabled() || need == Need::Nothing {
            return Ok(None);
        }
        let header = header.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(AuthError::Missing)?
            .trim();
        let digest = sha256(token);
        // Every token is compared, match or not: the time taken does not
        // say which one (or whether one) matched.
        let mut found: Option<&TokenConfig> = None;
        for t in &self.tokens {
            if constant_time_eq(&t.sha256, &digest) && found.is_none() {
                found = Some(t);
            }
        }
        let t = found.ok_or(AuthError::Invalid)?;
        let allowed = matches!(
            (t.role, need),
            (Role::Admin, _) | (Role::Ingest, Need::Ingest) | (Role::Read, Need::Read)
        );
        if !allowed {
            return Err(AuthError::Forbidden {
                token: t.name.clone(),
                role: t.role.as_str(),
                what: match need {
                    Need::Ingest => "write events",
                    Need::Read => "read",
                    Need::Admin => "administer (delete, compact, snapshots)",
                    Need::Nothing => "do this",
                },
            });
        }
        Ok(Some(Principal {
            name: t.name.clone(),
            role: t.role,
            sources: t.sources.clone(),
        }))
    }

    /// Checks that `principal` may write every source of `sources`.
    pub fn check_sources<'a>(
        principal: Option<&Principal>,
        sources: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), AuthError> {
        let Some(p) = principal else {
            return Ok(());
        };
        for s in sources {
            if !p.may_write(s) {
                return Err(AuthError::Source {
                    token: p.name.clone(),
                    source_system: s.to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// What an HTTP request needs, by method and path.
pub fn http_need(method: &axum::http::Method, path: &str) -> Need {
    use axum::http::Method;
    if path == "/health" {
        return Need::Nothing;
    }
    if path.starts_with("/admin/") || path == "/admin" || *method == Method::DELETE {
        return Need::Admin;
    }
    if *method == Method::POST && (path == "/events" || path == "/events/batch") {
        return Need::Ingest;
    }
    Need::Read
}

/// What a gRPC method needs.
pub fn grpc_need(path: &str) -> Need {
    if path.starts_with("/grpc.health.v1.Health/") || path.ends_with("/Healthz") {
        return Need::Nothing;
    }
    match path.rsplit('/').next().unwrap_or("") {
        "IngestEvent" | "IngestEventBatch" | "Ingest" | "IngestStream" => Need::Ingest,
        "Delete" | "Compact" => Need::Admin,
        _ => Need::Read,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(vec![
            TokenConfig {
                name: "collector".into(),
                sha256: sha256("in-secret"),
                role: Role::Ingest,
                sources: Some(vec!["mahavishnu".into()]),
            },
            TokenConfig {
                name: "dash".into(),
                sha256: sha256("read-secret"),
                role: Role::Read,
                sources: None,
            },
            TokenConfig {
                name: "ops".into(),
                sha256: sha256("admin-secret"),
                role: Role::Admin,
                sources: None,
            },
        ])
    }

    #[test]
    fn roles_and_sources() {
        let a = auth();
        assert_eq!(a.check(None, Need::Read), Err(AuthError::Missing));
        assert_eq!(
            a.check(Some("Bearer nope"), Need::Read),
            Err(AuthError::Invalid)
        );
        assert_eq!(a.check(None, Need::Nothing), Ok(None));
        let p = a
            .check(Some("Bearer in-secret"), Need::Ingest)
            .unwrap()
            .unwrap();
        assert!(Auth::check_sources(Some(&p), ["mahavishnu"]).is_ok());
        assert!(matches!(
            Auth::check_sources(Some(&p), ["mahavishnu", "akosha"]),
            Err(AuthError::Source { .. })
        ));
        assert!(matches!(
            a.check(Some("Bearer in-secret"), Need::Read),
            Err(AuthError::Forbidden { .. })
        ));
        assert!(a.check(Some("Bearer read-secret"), Need::Read).is_ok());
        assert!(a.check(Some("Bearer read-secret"), Need::Ingest).is_err());
        assert!(a.check(Some("Bearer read-secret"), Need::Admin).is_err());
        assert!(a.check(Some("Bearer admin-secret"), Need::Admin).is_ok());
        assert!(a.check(Some("Bearer admin-secret"), Need::Ingest).is_ok());
        assert_eq!(Auth::default().check(None, Need::Admin), Ok(None));
    }

    #[test]
    fn needs() {
        use axum::http::Method;
        assert_eq!(http_need(&Method::GET, "/health"), Need::Nothing);
        assert_eq!(http_need(&Method::POST, "/events/batch"), Need::Ingest);
        assert_eq!(http_need(&Method::GET, "/metrics"), Need::Read);
        assert_eq!(http_need(&Method::DELETE, "/events/x"), Need::Admin);
        assert_eq!(http_need(&Method::POST, "/admin/snapshots"), Need::Admin);
        assert_eq!(grpc_need("/evdb.v1.Evdb/Tail"), Need::Read);
        assert_eq!(grpc_need("/evdb.v1.Evdb/IngestStream"), Need::Ingest);
        assert_eq!(grpc_need("/grpc.health.v1.Health/Check"), Need::Nothing);
        assert_eq!(
            grpc_need("/chaukas.spec.server.v1.ChaukasServerService/QueryEvents"),
            Need::Read
        );
    }
}
