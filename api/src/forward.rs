//! The forward API's binary messages (docs/forward-api.md), encoded and decoded by one
//! definition that the worker and the clients share.
//!
//! A request carries one MoE layer's hidden states `[T, H]` (bf16 or f32), optionally with the
//! caller's routing; a response carries the MoE block output in the request's dtype, or an
//! HTTP status with a one-line reason. The structural checks (magic, version, dtype, flags,
//! exact length) live here; whether the layer, hidden size, top-k and expert ids fit the model
//! is the worker's business.

use half::bf16;

#[cfg(feature = "client")]
pub mod client;

/// Path of the one-request endpoint.
pub const FORWARD_PATH: &str = "/v1/forward";
/// Path of the pipelined stream (an HTTP/1.1 upgrade).
pub const STREAM_PATH: &str = "/v1/forward/stream";
/// The `Upgrade` protocol token of the stream.
pub const STREAM_PROTOCOL: &str = "moe-forward/1";
pub const REQUEST_MAGIC: [u8; 4] = *b"MOEF";
pub const RESPONSE_MAGIC: [u8; 4] = *b"MOER";
pub const VERSION: u16 = 1;
/// Bytes of the fixed header of both messages.
pub const HEADER_LEN: usize = 32;
/// Request flag bit 0: the caller supplies the routing (expert ids and weights).
pub const FLAG_ROUTING: u8 = 1;

/// Element type of the hidden states (and of the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Bf16 = 0,
    F32 = 1,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::Bf16 => 2,
            Dtype::F32 => 4,
        }
    }
    fn from_code(code: u8) -> Option<Dtype> {
        match code {
            0 => Some(Dtype::Bf16),
            1 => Some(Dtype::F32),
            _ => None,
        }
    }
}

/// Row-major values of one dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    Bf16(Vec<bf16>),
    F32(Vec<f32>),
}

impl Tensor {
    pub fn dtype(&self) -> Dtype {
        match self {
            Tensor::Bf16(_) => Dtype::Bf16,
            Tensor::F32(_) => Dtype::F32,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Tensor::Bf16(v) => v.len(),
            Tensor::F32(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The values as bf16 (f32 rounded to nearest even).
    pub fn to_bf16(&self) -> Vec<bf16> {
        match self {
            Tensor::Bf16(v) => v.clone(),
            Tensor::F32(v) => v.iter().map(|&x| bf16::from_f32(x)).collect(),
        }
    }
    /// bf16 values in `dtype` (f32: widened exactly).
    pub fn from_bf16(values: Vec<bf16>, dtype: Dtype) -> Tensor {
        match dtype {
            Dtype::Bf16 => Tensor::Bf16(values),
            Dtype::F32 => Tensor::F32(values.iter().map(|v| v.to_f32()).collect()),
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Tensor::Bf16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_bits().to_le_bytes())),
            Tensor::F32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }
    fn decode(bytes: &[u8], dtype: Dtype) -> Tensor {
        match dtype {
            Dtype::Bf16 => Tensor::Bf16(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            Dtype::F32 => Tensor::F32(f32s(bytes)),
        }
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Routing chosen by the caller: `[T, K]` logical expert ids and their weights, used as given.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// The fixed header of a request message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub dtype: Dtype,
    pub routing: bool,
    /// Decoder-layer index of the checkpoint.
    pub layer: u32,
    pub rows: u32,
    pub hidden: u32,
    pub top_k: u16,
    pub id: u64,
}

/// A message that cannot be decoded: the HTTP status to answer with, a one-line reason, and
/// the header when it was readable (so the answer can carry the request's id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub status: u16,
    pub reason: String,
    pub header: Option<RequestHeader>,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.reason)
    }
}

impl std::error::Error for DecodeError {}

fn bad(reason: String, header: Option<RequestHeader>) -> DecodeError {
    DecodeError {
        status: 400,
        reason,
        header,
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl RequestHeader {
    /// Reads the header from the first [`HEADER_LEN`] bytes of a request message.
    pub fn parse(msg: &[u8]) -> Result<RequestHeader, DecodeError> {
        if msg.len() < HEADER_LEN {
            return Err(bad(
                format!(
                    "truncated body: {} bytes, a request has a {HEADER_LEN}-byte header",
                    msg.len()
                ),
                None,
            ));
        }
        if msg[..4] != REQUEST_MAGIC {
            return Err(bad("bad magic: expected MOEF".into(), None));
        }
        let version = u16_at(msg, 4);
        if version != VERSION {
            return Err(bad(
                format!("unsupported version {version} (this worker speaks {VERSION})"),
                None,
            ));
        }
        let dtype_code = msg[6];
        let flags = msg[7];
        // The rest is readable from here on: errors carry the header (its id).
        let mut header = RequestHeader {
            dtype: Dtype::Bf16,
            routing: flags & FLAG_ROUTING != 0,
            layer: u32_at(msg, 8),
            rows: u32_at(msg, 12),
            hidden: u32_at(msg, 16),
            top_k: u16_at(msg, 20),
            id: u64_at(msg, 24),
        };
        header.dtype = Dtype::from_code(dtype_code).ok_or_else(|| {
            bad(
                format!("bad dtype {dtype_code}: 0 = bf16, 1 = f32"),
                Some(header),
            )
        })?;
        if flags & !FLAG_ROUTING != 0 {
            return Err(bad(
                format!("bad flags {flags:#04x}: only bit 0 (routing supplied) is defined"),
                Some(header),
            ));
        }
        if u16_at(msg, 22) != 0 {
            return Err(bad("reserved bytes 22..24 must be 0".into(), Some(header)));
        }
        if !header.routing && header.top_k != 0 {
            return Err(bad(
                format!(
                    "top_k is {} but the routing flag is not set (top_k must be 0 without routing)",
                    header.top_k
                ),
                Some(header),
            ));
        }
        Ok(header)
    }

    /// Length of the whole message this header announces.
    pub fn message_len(&self) -> u64 {
        let (t, h, k) = (
            u64::from(self.rows),
            u64::from(self.hidden),
            u64::from(self.top_k),
        );
        let routing = if self.routing { t * k * 8 } else { 0 };
        HEADER_LEN as u64 + t * h * self.dtype.size() as u64 + routing
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.dtype as u8);
        out.push(if self.routing { FLAG_ROUTING } else { 0 });
        out.extend_from_slice(&self.layer.to_le_bytes());
        out.extend_from_slice(&self.rows.to_le_bytes());
        out.extend_from_slice(&self.hidden.to_le_bytes());
        out.extend_from_slice(&self.top_k.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
    }
}

/// One forward request.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardRequest {
    pub id: u64,
    /// Decoder-layer index of the checkpoint.
    pub layer: u32,
    pub hidden: usize,
    /// `[T, hidden]` row-major.
    pub x: Tensor,
    pub routing: Option<Routing>,
}

impl ForwardRequest {
    pub fn rows(&self) -> usize {
        self.x.len().checked_div(self.hidden).unwrap_or(0)
    }

    pub fn header(&self) -> RequestHeader {
        RequestHeader {
            dtype: self.x.dtype(),
            routing: self.routing.is_some(),
            layer: self.layer,
            rows: self.rows() as u32,
            hidden: self.hidden as u32,
            top_k: self.routing.as_ref().map_or(0, |r| r.top_k as u16),
            id: self.id,
        }
    }

    /// The request message.
    pub fn encode(&self) -> Vec<u8> {
        let header = self.header();
        let mut out = Vec::with_capacity(header.message_len() as usize);
        header.encode(&mut out);
        self.x.encode(&mut out);
        if let Some(r) = &self.routing {
            r.ids
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            r.weights
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        out
    }

    /// Decodes a whole request message (structure only: see the module docs).
    pub fn decode(msg: &[u8]) -> Result<ForwardRequest, DecodeError> {
        let header = RequestHeader::parse(msg)?;
        ForwardRequest::decode_with(header, msg)
    }

    /// Decodes the message whose header was already parsed.
    pub fn decode_with(header: RequestHeader, msg: &[u8]) -> Result<ForwardRequest, DecodeError> {
        let want = header.message_len();
        let got = msg.len() as u64;
        if got < want {
            return Err(bad(
                format!("truncated body: {got} bytes, the header announces {want}"),
                Some(header),
            ));
        }
        if got > want {
            return Err(bad(
                format!("body too long: {got} bytes, the header announces {want}"),
                Some(header),
            ));
        }
        let (t, h, k) = (
            header.rows as usize,
            header.hidden as usize,
            header.top_k as usize,
        );
        let x_end = HEADER_LEN + t * h * header.dtype.size();
        let x = Tensor::decode(&msg[HEADER_LEN..x_end], header.dtype);
        let routing = header.routing.then(|| {
            let ids_end = x_end + t * k * 4;
            Routing {
                top_k: k,
                ids: u32s(&msg[x_end..ids_end]),
                weights: f32s(&msg[ids_end..]),
            }
        });
        Ok(ForwardRequest {
            id: header.id,
            layer: header.layer,
            hidden: h,
            x,
            routing,
        })
    }
}

/// What a response carries: the block output, or an error status with its reason.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok(Tensor),
    Err {
        status: u16,
        reason: String,
        /// Seconds to wait before retrying (503), 0 otherwise.
        retry_after: u16,
    },
}

/// One forward response.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardResponse {
    pub id: u64,
    pub layer: u32,
    pub rows: u32,
    pub hidden: u32,
    /// The dtype of the answer (the request's; bf16 for an error to an unreadable request).
    pub dtype: Dtype,
    pub outcome: Outcome,
}

impl ForwardResponse {
    /// The successful answer to `header`'s request.
    pub fn ok(header: &RequestHeader, values: Tensor) -> ForwardResponse {
        ForwardResponse {
            id: header.id,
            layer: header.layer,
            rows: header.rows,
            hidden: header.hidden,
            dtype: values.dtype(),
            outcome: Outcome::Ok(values),
        }
    }

    /// An error answer, echoing `header` when the request's header was readable.
    pub fn error(
        header: Option<&RequestHeader>,
        status: u16,
        reason: impl Into<String>,
        retry_after: u16,
    ) -> ForwardResponse {
        // One line: a reason never spans lines.
        let reason: String = reason.into().replace(['\n', '\r'], " ");
        ForwardResponse {
            id: header.map_or(0, |h| h.id),
            layer: header.map_or(0, |h| h.layer),
            rows: header.map_or(0, |h| h.rows),
            hidden: header.map_or(0, |h| h.hidden),
            dtype: header.map_or(Dtype::Bf16, |h| h.dtype),
            outcome: Outcome::Err {
                status,
                reason,
                retry_after,
            },
        }
    }

    pub fn status(&self) -> u16 {
        match &self.outcome {
            Outcome::Ok(_) => 200,
            Outcome::Err { status, .. } => *status,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let payload = match &self.outcome {
            Outcome::Ok(t) => t.len() * t.dtype().size(),
            Outcome::Err { reason, .. } => reason.len(),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + payload);
        out.extend_from_slice(&RESPONSE_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.dtype as u8);
        out.push(0);
        out.extend_from_slice(&self.layer.to_le_bytes());
        out.extend_from_slice(&self.rows.to_le_bytes());
        out.extend_from_slice(&self.hidden.to_le_bytes());
        let (status, retry_after) = match &self.outcome {
            Outcome::Ok(_) => (200u16, 0u16),
            Outcome::Err {
                status,
                retry_after,
                ..
            } => (*status, *retry_after),
        };
        out.extend_from_slice(&status.to_le_bytes());
        out.extend_from_slice(&retry_after.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        match &self.outcome {
            Outcome::Ok(t) => t.encode(&mut out),
            Outcome::Err { reason, .. } => out.extend_from_slice(reason.as_bytes()),
        }
        out
    }

    /// Decodes a response message.
    pub fn decode(msg: &[u8]) -> Result<ForwardResponse, String> {
        if msg.len() < HEADER_LEN {
            return Err(format!(
                "response of {} bytes is shorter than its header",
                msg.len()
            ));
        }
        if msg[..4] != RESPONSE_MAGIC {
            return Err("bad response magic: expected MOER".into());
        }
        let version = u16_at(msg, 4);
        if version != VERSION {
            return Err(format!("unsupported response version {version}"));
        }
        let dtype =
            Dtype::from_code(msg[6]).ok_or_else(|| format!("bad response dtype {}", msg[6]))?;
        let (layer, rows, hidden) = (u32_at(msg, 8), u32_at(msg, 12), u32_at(msg, 16));
        let status = u16_at(msg, 20);
        let retry_after = u16_at(msg, 22);
        let id = u64_at(msg, 24);
        let body = &msg[HEADER_LEN..];
        let outcome = if status == 200 {
            let want = rows as usize * hidden as usize * dtype.size();
            if body.len() != want {
                return Err(format!(
                    "response {id} has {} bytes of values, expected {want}",
                    body.len()
                ));
            }
            Outcome::Ok(Tensor::decode(body, dtype))
        } else {
            Outcome::Err {
                status,
                reason: String::from_utf8_lossy(body).into_owned(),
                retry_after,
            }
        };
        Ok(ForwardResponse {
            id,
            layer,
            rows,
            hidden,
            dtype,
            outcome,
        })
    }
}

/// Bytes of the largest request a worker with this model and row limit accepts (the stream's
/// frame-length bound).
pub fn max_request_len(max_rows: usize, hidden: usize, top_k: usize) -> u64 {
    let (t, h, k) = (max_rows as u64, hidden as u64, top_k as u64);
    HEADER_LEN as u64 + t * h * 4 + t * k * 8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(routing: bool, dtype: Dtype) -> ForwardRequest {
        let x: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        ForwardRequest {
            id: 0x0102_0304_0506_0708,
            layer: 3,
            hidden: 3,
            x: match dtype {
                Dtype::Bf16 => Tensor::Bf16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
                Dtype::F32 => Tensor::F32(x),
            },
            routing: routing.then(|| Routing {
                top_k: 2,
                ids: vec![0, 5, 2, 1],
                weights: vec![0.75, 0.25, 0.5, 0.5],
            }),
        }
    }

    #[test]
    fn the_header_is_laid_out_as_documented() {
        let msg = request(true, Dtype::F32).encode();
        assert_eq!(&msg[..4], b"MOEF");
        assert_eq!(msg[4..6], [1, 0]);
        assert_eq!((msg[6], msg[7]), (1, 1));
        assert_eq!(msg[8..12], [3, 0, 0, 0]);
        assert_eq!(msg[12..16], [2, 0, 0, 0]);
        assert_eq!(msg[16..20], [3, 0, 0, 0]);
        assert_eq!(msg[20..24], [2, 0, 0, 0]);
        assert_eq!(msg[24..32], [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(msg.len(), 32 + 6 * 4 + 4 * 4 + 4 * 4);
        // -1.0 as f32, little-endian, then the ids.
        assert_eq!(msg[32..36], (-1.0f32).to_le_bytes());
        assert_eq!(msg[56..60], [0, 0, 0, 0]);
        assert_eq!(msg[60..64], [5, 0, 0, 0]);
    }

    #[test]
    fn requests_round_trip() {
        for routing in [false, true] {
            for dtype in [Dtype::Bf16, Dtype::F32] {
                let r = request(routing, dtype);
                assert_eq!(ForwardRequest::decode(&r.encode()).unwrap(), r);
            }
        }
    }

    #[test]
    fn malformed_requests_name_the_fault_and_keep_the_id_when_readable() {
        let msg = request(false, Dtype::Bf16).encode();
        let e = ForwardRequest::decode(&msg[..msg.len() - 1]).unwrap_err();
        assert!(e.reason.starts_with("truncated body"), "{e}");
        assert_eq!(e.header.map(|h| h.id), Some(0x0102_0304_0506_0708));
        let mut long = msg.clone();
        long.push(0);
        assert!(
            ForwardRequest::decode(&long)
                .unwrap_err()
                .reason
                .starts_with("body too long")
        );
        let mut m = msg.clone();
        m[0] = b'X';
        let e = ForwardRequest::decode(&m).unwrap_err();
        assert!(e.reason.contains("magic") && e.header.is_none(), "{e}");
        let mut m = msg.clone();
        m[4] = 2;
        assert!(
            ForwardRequest::decode(&m)
                .unwrap_err()
                .reason
                .contains("version 2")
        );
        let mut m = msg.clone();
        m[6] = 7;
        let e = ForwardRequest::decode(&m).unwrap_err();
        assert!(e.reason.contains("dtype 7") && e.header.is_some(), "{e}");
        let mut m = msg.clone();
        m[7] = 2;
        assert!(
            ForwardRequest::decode(&m)
                .unwrap_err()
                .reason
                .contains("flags")
        );
        let mut m = msg.clone();
        m[20] = 1;
        assert!(
            ForwardRequest::decode(&m)
                .unwrap_err()
                .reason
                .contains("top_k")
        );
        assert!(
            ForwardRequest::decode(&msg[..10])
                .unwrap_err()
                .reason
                .contains("truncated")
        );
    }

    #[test]
    fn responses_round_trip() {
        let header = request(false, Dtype::F32).header();
        let ok = ForwardResponse::ok(&header, Tensor::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let msg = ok.encode();
        assert_eq!(&msg[..4], b"MOER");
        assert_eq!(msg[20..22], [200, 0]);
        assert_eq!(ForwardResponse::decode(&msg).unwrap(), ok);
        let err = ForwardResponse::error(Some(&header), 503, "busy\nnow", 1);
        let back = ForwardResponse::decode(&err.encode()).unwrap();
        assert_eq!(
            back.outcome,
            Outcome::Err {
                status: 503,
                reason: "busy now".into(),
                retry_after: 1
            }
        );
        assert_eq!(back.id, header.id);
    }
}
