//! The wire format of a link: frames of `[channel: u8][length: u64 LE][payload]`, and the
//! channels multiplexed over each link.

use std::io::{self, Read, Write};
use std::net::TcpStream;

/// Channels multiplexed over each link.
pub const CHAN_STEP: u8 = 0;
pub const CHAN_CTRL: u8 = 1;
pub const CHAN_REMAP: u8 = 2;
pub(super) const CHAN_RENDEZVOUS: u8 = 3;
/// A rank that gives up tells its peers why (best effort) before it closes its links.
pub(super) const CHAN_ABORT: u8 = 4;
/// A rank that stops cleanly says so, so its closing link is not taken for a failure while
/// slower peers finish the same step boundary.
pub(super) const CHAN_BYE: u8 = 5;

const MAX_FRAME: u64 = 1 << 34;
/// Large payloads (expert weights) travel in frames of this size, so step traffic interleaves.
pub const CHUNK: usize = 4 << 20;

pub(super) fn write_frame(s: &mut TcpStream, chan: u8, data: &[u8]) -> io::Result<()> {
    let mut header = [0u8; 9];
    header[0] = chan;
    header[1..].copy_from_slice(&(data.len() as u64).to_le_bytes());
    s.write_all(&header)?;
    s.write_all(data)
}

pub(super) fn read_frame(s: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 9];
    s.read_exact(&mut header)?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[1..]);
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((header[0], data))
}
