//! Proof of group membership at rendezvous.
//!
//! Anyone who can reach a rank's comm port could otherwise register as a missing rank and
//! take part in (or stall) the group. When the ranks share a secret (the control token the
//! operator mounts into every pod of a group), both ends of every rendezvous connection prove
//! they hold it without sending it: each sends a fresh random nonce, then answers
//! `HMAC-SHA256(token, "moe-rendezvous" || peer's nonce || own nonce || own rank || peer's rank)`.
//! The answer covers the other side's fresh nonce, so it cannot be replayed on another
//! connection, and the order of the fields differs between the two ends, so one end's answer
//! cannot be reflected back as the other's. Answers are compared in constant time.
//!
//! This authenticates the peer; it does not encrypt the link (the NetworkPolicy keeps the
//! comm port to the group's own pods).

use std::path::Path;

use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Domain separation: this key also authenticates the operator's control calls, which must
/// not be confused with rendezvous proofs.
const DOMAIN: &[u8] = b"moe-rendezvous";
/// Bytes of each side's nonce.
pub const NONCE_LEN: usize = 32;

/// The group's shared secret (the bytes of the control token).
#[derive(Clone)]
pub struct GroupKey(Vec<u8>);

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupKey(..)")
    }
}

impl GroupKey {
    /// A key from the token's text (surrounding whitespace, e.g. a trailing newline, is not
    /// part of it, as for the control API).
    pub fn new(token: &str) -> Result<Self> {
        let token = token.trim();
        if token.is_empty() {
            bail!("the group token is empty");
        }
        Ok(Self(token.as_bytes().to_vec()))
    }

    /// The key in `path` (the control-token file).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the control token file {path:?}"))?;
        Self::new(&text).with_context(|| format!("--control-token-file {path:?}"))
    }

    fn mac(&self, first: &[u8], second: &[u8], from: usize, to: usize) -> Hmac<Sha256> {
        // HMAC takes keys of any length: new_from_slice cannot fail for it.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(DOMAIN);
        m.update(first);
        m.update(second);
        m.update(&(from as u64).to_le_bytes());
        m.update(&(to as u64).to_le_bytes());
        m
    }

    /// This side's answer to the peer's challenge.
    pub fn proof(
        &self,
        their_nonce: &[u8],
        my_nonce: &[u8],
        my_rank: usize,
        their_rank: usize,
    ) -> Vec<u8> {
        self.mac(their_nonce, my_nonce, my_rank, their_rank)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Whether `proof` is the peer's correct answer to this side's `my_nonce` (constant time).
    pub fn verify(
        &self,
        proof: &[u8],
        my_nonce: &[u8],
        their_nonce: &[u8],
        my_rank: usize,
        their_rank: usize,
    ) -> bool {
        self.mac(my_nonce, their_nonce, their_rank, my_rank)
            .verify_slice(proof)
            .is_ok()
    }
}

/// A fresh nonce from the thread's cryptographic generator.
pub fn nonce() -> Vec<u8> {
    let mut n = vec![0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut n);
    n
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(text: &str) -> Result<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        bail!("not hex: odd length or non-ASCII");
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).context("not hex"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_side_accepts_the_others_proof_only() {
        let key = GroupKey::new("secret\n").unwrap();
        let (a, b) = (nonce(), nonce());
        // Rank 3 (nonce a) answers rank 0 (nonce b), and the other way round.
        let from_3 = key.proof(&b, &a, 3, 0);
        let from_0 = key.proof(&a, &b, 0, 3);
        assert!(key.verify(&from_3, &b, &a, 0, 3));
        assert!(key.verify(&from_0, &a, &b, 3, 0));
        // Reflected: rank 0's own answer is not rank 3's.
        assert!(!key.verify(&from_0, &b, &a, 0, 3));
        // Another rank id, another nonce, another key: refused.
        assert!(!key.verify(&from_3, &b, &a, 0, 2));
        assert!(!key.verify(&from_3, &nonce(), &a, 0, 3));
        let other = GroupKey::new("secret2").unwrap();
        assert!(!other.verify(&from_3, &b, &a, 0, 3));
        assert!(!key.verify(&from_3[..16], &b, &a, 0, 3));
    }

    #[test]
    fn empty_tokens_are_refused_and_whitespace_is_trimmed() {
        assert!(GroupKey::new(" \n").is_err());
        let (a, b) = (nonce(), nonce());
        let p = GroupKey::new("t").unwrap().proof(&a, &b, 1, 0);
        assert!(GroupKey::new(" t\n").unwrap().verify(&p, &a, &b, 0, 1));
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let n = nonce();
        assert_eq!(from_hex(&to_hex(&n)).unwrap(), n);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
        assert!(from_hex("é1").is_err());
    }
}
