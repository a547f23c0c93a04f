//! A minimal blocking HTTP/1.1 client for the CLI's `--url` mode (talking
//! to a running daemon), on `hyper`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Sends `method path` to the daemon at `base` (`http://HOST:PORT`);
/// returns the status and body.
pub fn call(base: &str, method: &str, path: &str) -> anyhow::Result<(u16, Bytes)> {
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("--url {base:?}: use http://HOST:PORT"))?
        .trim_end_matches('/')
        .to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {authority}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &authority)
            .body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    })
}
