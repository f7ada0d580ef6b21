//! A minimal plain-HTTP GET for loopback health checks and readiness probes (no TLS, no
//! redirects): enough for etcd's `/health` and the pods' `httpGet` probes.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GETs `http://host:port/path`; returns the status code and the body (lossy UTF-8, at most
/// 64 KiB).
pub async fn get(host: &str, port: u16, path: &str, timeout: Duration) -> Result<(u16, String)> {
    get_with_headers(host, port, path, &[], timeout).await
}

/// Like [`get`], with extra request headers.
pub async fn get_with_headers(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<(u16, String)> {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect((host, port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: moe-e2e-probe\r\nAccept: */*\r\nConnection: close\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 || buf.len() > 64 * 1024 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status_line = text.lines().next().unwrap_or_default();
        let mut parts = status_line.split_whitespace();
        let (Some(proto), Some(code)) = (parts.next(), parts.next()) else {
            bail!("malformed HTTP response from {host}:{port}: {status_line:?}");
        };
        if !proto.starts_with("HTTP/") {
            bail!("malformed HTTP response from {host}:{port}: {status_line:?}");
        }
        let code: u16 = code.parse().context("HTTP status code")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    })
    .await
    .context("HTTP GET timed out")?
}
