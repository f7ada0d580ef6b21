//! What a request to a rank comes back with, whichever way the rank is reached.

use bytes::Bytes;

/// An answer: its HTTP status and body.
pub struct Fetched {
    pub status: u16,
    pub body: Bytes,
}

/// Why a poll failed: an answer that ends the recording (not one group, a restart, another
/// shape, no permission), or a request that may succeed at the next poll.
pub enum Poll {
    Stop(String),
    Retry(String),
}
