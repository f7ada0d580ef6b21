//! Rust clients of the forward API: one request per HTTP request ([`Client`]) and the
//! pipelined stream ([`Stream`]: many requests in flight on one connection, matched by id).
//!
//! ```no_run
//! # async fn demo() -> Result<(), moe_api::forward::client::ClientError> {
//! use moe_api::forward::{Tensor, client::Stream};
//! let stream = Stream::connect("http://127.0.0.1:8080", None).await?;
//! let y = stream.forward(1, 64, Tensor::F32(vec![0.0; 64]), None).await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, oneshot};

use super::{
    FORWARD_PATH, ForwardRequest, ForwardResponse, Outcome, Routing, STREAM_PATH, STREAM_PROTOCOL,
    Tensor,
};

/// What went wrong with a call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The worker answered with an error status and a reason.
    #[error("the worker answered {status}: {reason}")]
    Server {
        status: u16,
        reason: String,
        /// Seconds to wait before retrying (with 503).
        retry_after: Option<u16>,
    },
    /// The connection failed or closed.
    #[error("transport: {0}")]
    Transport(String),
    /// The worker sent something that is not a forward-API message.
    #[error("protocol: {0}")]
    Protocol(String),
}

fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// The `Retry-After` seconds of an error answer, when it has a valid one.
fn retry_after(headers: &hyper::HeaderMap) -> Option<u16> {
    headers
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The error for a non-success HTTP answer: its status and its body as the reason.
fn server_error(status: u16, body: &[u8], retry_after: Option<u16>) -> ClientError {
    ClientError::Server {
        status,
        reason: String::from_utf8_lossy(body).trim().to_string(),
        retry_after,
    }
}

/// `host:port` of `http://host:port[/]` (or of a bare `host:port`).
fn authority(endpoint: &str) -> Result<String, ClientError> {
    let rest = endpoint.strip_prefix("http://").unwrap_or(endpoint);
    if rest.starts_with("https://") {
        return Err(ClientError::Transport(
            "https endpoints are not supported: the forward API is plain HTTP".into(),
        ));
    }
    let auth = rest.trim_end_matches('/');
    if auth.is_empty() || auth.contains('/') {
        return Err(ClientError::Transport(format!(
            "endpoint `{endpoint}` is not http://host:port"
        )));
    }
    Ok(auth.to_string())
}

async fn connect_tcp(authority: &str) -> Result<TcpStream, ClientError> {
    let tcp = TcpStream::connect(authority)
        .await
        .map_err(|e| ClientError::Transport(format!("connecting to {authority}: {e}")))?;
    tcp.set_nodelay(true).map_err(transport)?;
    Ok(tcp)
}

fn into_result(resp: ForwardResponse) -> Result<Tensor, ClientError> {
    match resp.outcome {
        Outcome::Ok(t) => Ok(t),
        Outcome::Err {
            status,
            reason,
            retry_after,
        } => Err(ClientError::Server {
            status,
            reason,
            retry_after: (retry_after > 0).then_some(retry_after),
        }),
    }
}

/// `POST /v1/forward` over one keep-alive connection (one request at a time).
pub struct Client {
    authority: String,
    token: Option<String>,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    next_id: u64,
}

impl Client {
    pub async fn connect(endpoint: &str, token: Option<&str>) -> Result<Client, ClientError> {
        let authority = authority(endpoint)?;
        let tcp = connect_tcp(&authority).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(transport)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client {
            authority,
            token: token.map(str::to_string),
            sender,
            next_id: 1,
        })
    }

    /// The MoE block output of `x` (`[T, hidden]`) at decoder layer `layer`, in `x`'s dtype.
    pub async fn forward(
        &mut self,
        layer: u32,
        hidden: usize,
        x: Tensor,
        routing: Option<Routing>,
    ) -> Result<Tensor, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let resp = self
            .send(&ForwardRequest {
                id,
                layer,
                hidden,
                x,
                routing,
            })
            .await?;
        if resp.id != id {
            return Err(ClientError::Protocol(format!(
                "answer to request {} for request {id}",
                resp.id
            )));
        }
        into_result(resp)
    }

    /// Sends one request message as it is (a test can send malformed ones with
    /// [`Client::send_raw`]).
    pub async fn send(&mut self, req: &ForwardRequest) -> Result<ForwardResponse, ClientError> {
        match self.send_raw(req.encode()).await? {
            (_, Some(resp)) => Ok(resp),
            (status, None) => Err(ClientError::Protocol(format!(
                "status {status} without a response message"
            ))),
        }
    }

    /// Posts `body` as it is. A 200 gives the decoded response; an error status gives
    /// [`ClientError::Server`] with the plain-text reason.
    pub async fn send_raw(
        &mut self,
        body: Vec<u8>,
    ) -> Result<(u16, Option<ForwardResponse>), ClientError> {
        self.sender.ready().await.map_err(transport)?;
        let mut req = Request::post(FORWARD_PATH)
            .header(HOST, &self.authority)
            .header(CONTENT_TYPE, "application/octet-stream");
        if let Some(t) = &self.token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(transport)?;
        let resp = self.sender.send_request(req).await.map_err(transport)?;
        let status = resp.status();
        let retry_after = retry_after(resp.headers());
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(transport)?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(server_error(status.as_u16(), &body, retry_after));
        }
        let resp = ForwardResponse::decode(&body).map_err(ClientError::Protocol)?;
        Ok((200, Some(resp)))
    }
}

type Waiters = Arc<std::sync::Mutex<Option<HashMap<u64, oneshot::Sender<ForwardResponse>>>>>;

/// The pipelined stream: `forward` may be called from many tasks at once; each call sends one
/// frame and waits for the answer with its id. Ids are assigned by the stream.
pub struct Stream {
    writer: Mutex<WriteHalf<TokioIo<hyper::upgrade::Upgraded>>>,
    waiters: Waiters,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Stream {
    /// Upgrades a connection to `endpoint` to the stream (`POST /v1/forward/stream`).
    pub async fn connect(endpoint: &str, token: Option<&str>) -> Result<Stream, ClientError> {
        let authority = authority(endpoint)?;
        let tcp = connect_tcp(&authority).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(transport)?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut req = Request::post(STREAM_PATH)
            .header(HOST, &authority)
            .header(CONNECTION, "Upgrade")
            .header(UPGRADE, STREAM_PROTOCOL);
        if let Some(t) = token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(transport)?;
        let resp = sender.send_request(req).await.map_err(transport)?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status().as_u16();
            let retry_after = retry_after(resp.headers());
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(server_error(status, &body, retry_after));
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(transport)?;
        let (rd, wr) = tokio::io::split(TokioIo::new(upgraded));
        // Buffered: an answer's length and message usually arrive in one read.
        let mut rd = tokio::io::BufReader::with_capacity(64 << 10, rd);
        let waiters: Waiters = Arc::new(std::sync::Mutex::new(Some(HashMap::new())));
        let w2 = waiters.clone();
        let reader = tokio::spawn(async move {
            loop {
                let mut len = [0u8; 4];
                if rd.read_exact(&mut len).await.is_err() {
                    break;
                }
                let mut msg = vec![0u8; u32::from_le_bytes(len) as usize];
                if rd.read_exact(&mut msg).await.is_err() {
                    break;
                }
                let Ok(resp) = ForwardResponse::decode(&msg) else {
                    break;
                };
                let mut guard = w2.lock().unwrap_or_else(|e| e.into_inner());
                let Some(map) = guard.as_mut() else { break };
                if resp.id == 0 && resp.status() != 200 && !map.contains_key(&0) {
                    // An unreadable frame: the worker closes the connection. Every caller in
                    // flight learns why.
                    for (_, tx) in map.drain() {
                        let _ = tx.send(resp.clone());
                    }
                    break;
                }
                if let Some(tx) = map.remove(&resp.id) {
                    let _ = tx.send(resp);
                }
            }
            // Closed: waiters see their sender dropped.
            w2.lock().unwrap_or_else(|e| e.into_inner()).take();
        });
        Ok(Stream {
            writer: Mutex::new(wr),
            waiters,
            next_id: AtomicU64::new(1),
            reader,
        })
    }

    /// The MoE block output of `x` (`[T, hidden]`) at decoder layer `layer`, in `x`'s dtype.
    pub async fn forward(
        &self,
        layer: u32,
        hidden: usize,
        x: Tensor,
        routing: Option<Routing>,
    ) -> Result<Tensor, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let req = ForwardRequest {
            id,
            layer,
            hidden,
            x,
            routing,
        };
        into_result(self.send_frame(id, req.encode()).await?)
    }

    /// Sends `msg` as one frame and waits for the answer with `id` (a test can send malformed
    /// messages this way; `id` must be the one in the message, or 0 for an unreadable one).
    pub async fn send_frame(&self, id: u64, msg: Vec<u8>) -> Result<ForwardResponse, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut guard = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            let map = guard
                .as_mut()
                .ok_or_else(|| ClientError::Transport("the stream is closed".into()))?;
            map.insert(id, tx);
        }
        let len = u32::try_from(msg.len())
            .map_err(|_| ClientError::Transport("request larger than 4 GiB".into()))?;
        {
            let mut w = self.writer.lock().await;
            let mut frame = Vec::with_capacity(4 + msg.len());
            frame.extend_from_slice(&len.to_le_bytes());
            frame.extend_from_slice(&msg);
            if let Err(e) = async {
                w.write_all(&frame).await?;
                w.flush().await
            }
            .await
            {
                self.forget(id);
                return Err(transport(e));
            }
        }
        rx.await
            .map_err(|_| ClientError::Transport("the worker closed the stream".into()))
    }

    fn forget(&self, id: u64) {
        if let Some(map) = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            map.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_host_port() {
        assert_eq!(authority("http://10.0.0.1:8081/").unwrap(), "10.0.0.1:8081");
        assert_eq!(authority("w-0.w.ns.svc:8081").unwrap(), "w-0.w.ns.svc:8081");
        assert!(authority("https://x:1").is_err());
        assert!(authority("http://x:1/v1/forward").is_err());
        assert!(authority("").is_err());
    }
}
