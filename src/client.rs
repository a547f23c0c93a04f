//! A minimal blocking HTTP/1.1 client for the CLI's `--url` mode (talking
//! to a running daemon), on `hyper`: one keep-alive connection, reopened
//! if the daemon closed it.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// The environment variable holding the bearer token the CLI sends to a
/// daemon that requires one (docs/security.md).
pub const TOKEN_ENV: &str = "EVDB_TOKEN";

/// A connection to the daemon at `http://HOST:PORT`.
pub struct Client {
    runtime: tokio::runtime::Runtime,
    authority: String,
    token: Option<String>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// A client for `base` (`http://HOST:PORT`); the bearer token, if any,
    /// comes from `EVDB_TOKEN`. Connects on the first request.
    pub fn new(base: &str) -> anyhow::Result<Client> {
        let authority = base
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("--url {base:?}: use http://HOST:PORT"))?
            .trim_end_matches('/')
            .to_owned();
        if authority.is_empty() || authority.contains('/') {
            anyhow::bail!("--url {base:?}: use http://HOST:PORT");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
        Ok(Client {
            runtime,
            authority,
            token,
            sender: None,
        })
    }

    /// Sends `method path` with `body` (of `content_type`, if given);
    /// returns the status and body.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req.body(Full::new(body))?;
        let authority = self.authority.clone();
        let cached = self.sender.take();
        let (sender, answer) = self.runtime.block_on(async move {
            let mut sender = match cached {
                Some(mut s) => match s.ready().await {
                    Ok(()) => s,
                    Err(_) => connect(&authority).await?,
                },
                None => connect(&authority).await?,
            };
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((sender, (status, body)))
        })?;
        self.sender = Some(sender);
        Ok(answer)
    }
}

async fn connect(authority: &str) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {authority}: {e}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends `method path` without a body to the daemon at `base`
/// (`http://HOST:PORT`); returns the status and body.
pub fn call(base: &str, method: &str, path: &str) -> anyhow::Result<(u16, Bytes)> {
    Client::new(base)?.request(method, path, None, Bytes::new())
}
