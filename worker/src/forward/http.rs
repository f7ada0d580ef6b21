//! The forward API's transports: `POST /v1/forward` and the pipelined stream
//! `POST /v1/forward/stream` (an HTTP/1.1 upgrade to length-prefixed frames).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use moe_api::AUTH_SCHEME;
use moe_api::forward::{
    FORWARD_PATH, ForwardRequest, ForwardResponse, HEADER_LEN, Outcome, RequestHeader, STREAM_PATH,
    STREAM_PROTOCOL, max_request_len,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

use super::{Refusal, refuse, serve};
use crate::state::Shared;

/// A request body, or the rest of a frame, must arrive within this once it has started.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream whose peer does not take its answers for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests in flight on one stream before the worker stops reading it.
const MAX_IN_FLIGHT: usize = 1024;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(FORWARD_PATH, post(forward_once))
        .route(STREAM_PATH, post(stream))
        // The body limit is the model's largest request, applied by the handler.
        .layer(DefaultBodyLimit::disable())
        .with_state(shared)
}

fn max_len(s: &Shared) -> u64 {
    max_request_len(
        s.forward_settings.max_request_rows,
        s.model.hidden,
        s.model.top_k,
    )
}

/// A plain-HTTP error answer (before or instead of a response message).
fn plain(r: &Refusal) -> Response {
    let code = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}\n", r.reason),
    )
        .into_response();
    if r.retry_after > 0 {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(r.retry_after));
    }
    if r.status == 401 {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(AUTH_SCHEME),
        );
    }
    resp
}

/// The client token check (constant-time); `Ok` when no token is configured.
fn authorize(s: &Shared, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(path) = &s.forward_settings.client_token_file else {
        return Ok(());
    };
    // Read on every call so a rotated Secret takes effect without a restart.
    let expected = std::fs::read_to_string(path)
        .map_err(|e| Refusal::new(500, format!("cannot read the client token file: {e}")))?;
    let expected = expected.trim();
    if expected.is_empty() {
        return Err(Refusal::new(401, "the client token file is empty"));
    }
    let presented = crate::http::bearer_token(headers);
    match presented {
        Some(t) if crate::http::same(t.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(Refusal::new(401, "invalid bearer token")),
        None => Err(Refusal::new(401, "missing Authorization: Bearer <token>")),
    }
}

async fn forward_once(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let resp = match forward_body(&s, &headers, body).await {
        Ok(resp) => resp,
        Err(r) => {
            let _ = refuse(&s, None, r.clone());
            return plain(&r);
        }
    };
    match &resp.outcome {
        Outcome::Ok(_) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/octet-stream")],
            resp.encode(),
        )
            .into_response(),
        Outcome::Err {
            status,
            reason,
            retry_after,
        } => plain(&Refusal {
            status: *status,
            reason: reason.clone(),
            retry_after: *retry_after,
        }),
    }
}

/// Reads, decodes and serves one `POST /v1/forward` body; errors before the request is
/// decoded come back as `Err` (counted by the caller), later ones inside the response.
async fn forward_body(
    s: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<ForwardResponse, Refusal> {
    authorize(s, headers)?;
    let limit = max_len(s);
    let collected = tokio::time::timeout(
        READ_TIMEOUT,
        Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).collect(),
    )
    .await
    .map_err(|_| {
        Refusal::new(
            408,
            format!("request body not received within {READ_TIMEOUT:?}"),
        )
    })?;
    let bytes: Bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Refusal::new(
                413,
                format!(
                    "body larger than the largest request ({limit} bytes: --max-request-rows {})",
                    s.forward_settings.max_request_rows
                ),
            ));
        }
        Err(e) => return Err(Refusal::new(400, format!("reading the body: {e}"))),
    };
    Ok(decode_and_serve(s, &bytes).await)
}

async fn decode_and_serve(s: &Shared, msg: &[u8]) -> ForwardResponse {
    let header = match RequestHeader::parse(msg) {
        Ok(h) => h,
        Err(e) => return refuse(s, None, Refusal::new(e.status, e.reason)),
    };
    // Too many rows is 413 whatever the body's length.
    if header.rows as usize > s.forward_settings.max_request_rows {
        return refuse(
            s,
            Some(&header),
            Refusal::new(
                413,
                format!(
                    "{} rows is more than --max-request-rows {}",
                    header.rows, s.forward_settings.max_request_rows
                ),
            ),
        );
    }
    match ForwardRequest::decode_with(header, msg) {
        Ok(req) => serve(s, header, req).await,
        Err(e) => refuse(s, Some(&header), Refusal::new(e.status, e.reason)),
    }
}

/// `POST /v1/forward/stream`: checks, then `101 Switching Protocols` and the frame loop on the
/// upgraded connection.
async fn stream(State(s): State<Arc<Shared>>, mut req: Request) -> Response {
    let refused = |r: Refusal| {
        let _ = refuse(&s, None, r.clone());
        plain(&r)
    };
    if let Err(r) = authorize(&s, req.headers()) {
        return refused(r);
    }
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if !upgrade.is_some_and(|u| u.eq_ignore_ascii_case(STREAM_PROTOCOL)) {
        return refused(Refusal::new(
            400,
            format!("the stream needs `Connection: Upgrade` and `Upgrade: {STREAM_PROTOCOL}`"),
        ));
    }
    if s.forward_settings.traffic != crate::config::TrafficMode::Api {
        return refused(Refusal::new(
            503,
            format!(
                "this group does not serve the forward API (--traffic {})",
                s.forward_settings.traffic.name()
            ),
        ));
    }
    if !s.is_ready() {
        return refused(Refusal::unavailable(
            "not ready: forming the group or loading weights",
        ));
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return refused(Refusal::new(
            400,
            "this connection cannot be upgraded (HTTP/1.1 needed)",
        ));
    };
    let shared = s.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => serve_stream(shared, TokioIo::new(upgraded)).await,
            Err(e) => tracing::debug!("forward stream upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, STREAM_PROTOCOL)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Reads one frame's message. `Ok(None)`: the peer closed cleanly between frames.
/// `Err(Some(resp))`: an unreadable frame, answered with id 0 before the connection closes.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    max: u64,
) -> Result<Option<Vec<u8>>, Option<Vec<u8>>> {
    // Idle between frames is fine; once a frame starts, the rest must follow promptly.
    let mut len = [0u8; 4];
    match rd.read(&mut len[..1]).await {
        Ok(0) | Err(_) => return Ok(None),
        Ok(_) => {}
    }
    let rest = async {
        rd.read_exact(&mut len[1..]).await?;
        let n = u64::from(u32::from_le_bytes(len));
        if n < HEADER_LEN as u64 || n > max {
            return Ok(Err(n));
        }
        let mut msg = vec![0u8; n as usize];
        rd.read_exact(&mut msg).await?;
        Ok::<_, std::io::Error>(Ok(msg))
    };
    match tokio::time::timeout(READ_TIMEOUT, rest).await {
        Err(_) | Ok(Err(_)) => Err(None),
        Ok(Ok(Ok(msg))) => Ok(Some(msg)),
        Ok(Ok(Err(n))) => Err(Some(
            ForwardResponse::error(
                None,
                400,
                format!("frame length {n} outside {HEADER_LEN}..={max}"),
                0,
            )
            .encode(),
        )),
    }
}

async fn serve_stream<IO>(s: Arc<Shared>, io: IO)
where
    IO: AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(io);
    // Buffered: a frame's length and message usually arrive in one read.
    let mut rd = tokio::io::BufReader::with_capacity(64 << 10, rd);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT);
    // The writer: answers as they come, several per flush; a peer that does not read them
    // within the bound is dropped (the reader below then stops too).
    let writer = tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(msg) = rx.recv().await {
            buf.clear();
            let mut push = |m: &[u8]| {
                buf.extend_from_slice(&(m.len() as u32).to_le_bytes());
                buf.extend_from_slice(m);
            };
            push(&msg);
            while let Ok(m) = rx.try_recv() {
                push(&m);
            }
            let w = async {
                wr.write_all(&buf).await?;
                wr.flush().await
            };
            match tokio::time::timeout(WRITE_TIMEOUT, w).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
        let _ = wr.shutdown().await;
    });
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let max = max_len(&s);
    loop {
        let permit = tokio::select! {
            p = in_flight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = tx.closed() => break,
        };
        let msg = tokio::select! {
            r = read_frame(&mut rd, max) => r,
            _ = tx.closed() => break,
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) | Err(None) => break,
            Err(Some(answer)) => {
                let _ = refuse(&s, None, Refusal::new(400, "unreadable frame"));
                let _ = tx.send(answer).await;
                break;
            }
        };
        if let Err(e) = RequestHeader::parse(&msg)
            && e.header.is_none()
        {
            // Wrong magic or version: the peer does not speak this protocol.
            let answer = refuse(&s, None, Refusal::new(e.status, e.reason));
            let _ = tx.send(answer.encode()).await;
            break;
        }
        // A readable header: even a bad request is answered with its id and the stream goes on.
        let (s2, tx2) = (s.clone(), tx.clone());
        tokio::spawn(async move {
            let answer = decode_and_serve(&s2, &msg).await;
            let _ = tx2.send(answer.encode()).await;
            drop(permit);
        });
    }
    drop(tx);
    // In-flight requests still answer into the channel; the writer ends when they have.
    let _ = writer.await;
}
