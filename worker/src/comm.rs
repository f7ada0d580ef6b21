//! The CPU communication backend: a connected group of ranks over TCP.
//!
//! How the group forms (rank 0 leads, the others register and receive the peer table, a fresh
//! epoch and the NCCL unique id, then a full mesh of links, each proving group membership when
//! a key is set) is `comm/rendezvous.rs`; the wire format of a link (channel-tagged frames) is
//! `comm/frame.rs`.
//!
//! Each link has a reader thread that drains frames into per-(peer, channel) queues, so
//! blocking writes never deadlock and a collective on one channel (the forward pass) runs
//! alongside a transfer on another (a remap's weights). A lost peer fails every waiting and
//! later receive with a reason.

mod frame;
mod rendezvous;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

use crate::doorbell::Doorbell;

pub use frame::{CHAN_CTRL, CHAN_REMAP, CHAN_STEP, CHUNK};
pub use rendezvous::{GroupInfo, RendezvousConfig, bind_listener, form_group, random_unique_id};

use frame::{CHAN_ABORT, CHAN_BYE, read_frame, write_frame};

#[derive(Default)]
struct InboxState {
    queues: HashMap<(usize, u8), VecDeque<Vec<u8>>>,
    failed: Option<String>,
    /// Peers that stopped cleanly.
    stopped: Vec<usize>,
}

#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    cv: Condvar,
    /// Rung when a control record arrives or a link fails (wakes an idle engine).
    bell: std::sync::OnceLock<Arc<Doorbell>>,
}

impl Inbox {
    fn push(&self, peer: usize, chan: u8, data: Vec<u8>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.queues.entry((peer, chan)).or_default().push_back(data);
        self.cv.notify_all();
        drop(st);
        if chan == CHAN_CTRL {
            self.ring();
        }
    }
    fn closed(&self, peer: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.stopped.push(peer);
        self.cv.notify_all();
        drop(st);
        self.ring();
    }
    fn fail(&self, reason: String) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.failed.is_none() {
            st.failed = Some(reason);
        }
        self.cv.notify_all();
        drop(st);
        self.ring();
    }
    /// The group's failure reason, waiting up to `timeout` for a reader to report one.
    fn wait_failure(&self, timeout: Duration) -> Option<String> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (st, _) = self
            .cv
            .wait_timeout_while(st, timeout, |st| st.failed.is_none())
            .unwrap_or_else(|e| e.into_inner());
        st.failed.clone()
    }
    fn ring(&self) {
        if let Some(b) = self.bell.get() {
            b.ring();
        }
    }
}

/// A connected group: framed, multiplexed links to every peer.
pub struct Comm {
    rank: usize,
    world: usize,
    writers: Vec<Option<Mutex<TcpStream>>>,
    inbox: Arc<Inbox>,
    timeout: Duration,
    readers: Vec<JoinHandle<()>>,
}

impl Comm {
    fn new(
        rank: usize,
        world: usize,
        links: Vec<Option<TcpStream>>,
        timeout: Duration,
    ) -> Result<Comm> {
        let inbox = Arc::new(Inbox::default());
        let mut writers = Vec::with_capacity(world);
        let mut readers = Vec::new();
        for (peer, link) in links.into_iter().enumerate() {
            let Some(s) = link else {
                writers.push(None);
                continue;
            };
            s.set_read_timeout(None)?;
            s.set_write_timeout(Some(timeout))?;
            // Buffered: a small frame's header and body arrive in one read (latency of the
            // per-layer exchanges); large payloads bypass the buffer.
            let mut r = io::BufReader::with_capacity(64 << 10, s.try_clone()?);
            let inbox2 = inbox.clone();
            readers.push(
                std::thread::Builder::new()
                    .name(format!("comm-rx-{peer}"))
                    .spawn(move || {
                        loop {
                            match read_frame(&mut r) {
                                Ok((CHAN_ABORT, data)) => {
                                    inbox2.fail(format!(
                                        "rank {peer} gave up: {}",
                                        String::from_utf8_lossy(&data)
                                    ));
                                    return;
                                }
                                Ok((CHAN_BYE, _)) => {
                                    inbox2.closed(peer);
                                    return;
                                }
                                Ok((chan, data)) => inbox2.push(peer, chan, data),
                                Err(e) => {
                                    let reason = if e.kind() == io::ErrorKind::UnexpectedEof {
                                        format!(
                                            "rank {peer} closed its connection (it exited or was killed)"
                                        )
                                    } else {
                                        format!("connection to rank {peer} failed: {e}")
                                    };
                                    inbox2.fail(reason);
                                    return;
                                }
                            }
                        }
                    })?,
            );
            writers.push(Some(Mutex::new(s)));
        }
        Ok(Comm {
            rank,
            world,
            writers,
            inbox,
            timeout,
            readers,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }

    /// Rings `bell` whenever a control record arrives from a peer or a link fails.
    pub fn set_doorbell(&self, bell: Arc<Doorbell>) {
        let _ = self.inbox.bell.set(bell);
    }

    /// Whether a peer's message on `chan` waits to be received (a peer started a round), or
    /// the group is broken or a peer stopped (a receive would return at once).
    pub fn has_pending(&self, chan: u8) -> bool {
        let st = self.inbox.state.lock().unwrap_or_else(|e| e.into_inner());
        st.failed.is_some()
            || !st.stopped.is_empty()
            || st
                .queues
                .iter()
                .any(|((_, c), q)| *c == chan && !q.is_empty())
    }

    /// The first failure seen on any link, if any.
    pub fn failure(&self) -> Option<String> {
        self.inbox
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed
            .clone()
    }

    pub fn send(&self, peer: usize, chan: u8, data: Vec<u8>) -> Result<()> {
        if peer == self.rank {
            self.inbox.push(peer, chan, data);
            return Ok(());
        }
        let w = self
            .writers
            .get(peer)
            .and_then(Option::as_ref)
            .ok_or_else(|| anyhow!("no link to rank {peer}"))?;
        let mut s = w.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut s, chan, &data).map_err(|e| {
            // A peer that gave up sent its reason (an abort frame) before it closed, or its
            // link's reader sees it go: prefer that reason, which names the rank at fault, to
            // this broken pipe, if a reader reports it soon.
            let reason = self
                .inbox
                .wait_failure(Duration::from_millis(500))
                .unwrap_or_else(|| format!("sending to rank {peer} failed: {e}"));
            self.inbox.fail(reason.clone());
            anyhow!("group broken: {reason}")
        })
    }

    /// Tells every peer this rank stops cleanly (after the group agreed to stop).
    pub fn goodbye(&self) {
        for (peer, w) in self.writers.iter().enumerate() {
            if let Some(w) = w
                && peer != self.rank
            {
                let mut s = w.lock().unwrap_or_else(|e| e.into_inner());
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = write_frame(&mut s, CHAN_BYE, &[]);
            }
        }
    }

    /// Tells every peer why this rank gives up (best effort, before its links close).
    pub fn abort(&self, reason: &str) {
        for (peer, w) in self.writers.iter().enumerate() {
            if let Some(w) = w
                && peer != self.rank
            {
                let mut s = w.lock().unwrap_or_else(|e| e.into_inner());
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = write_frame(&mut s, CHAN_ABORT, reason.as_bytes());
            }
        }
    }

    /// Sends a large payload in [`CHUNK`]-sized frames (receive with [`Comm::recv_len`]).
    pub fn send_chunked(&self, peer: usize, chan: u8, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return self.send(peer, chan, Vec::new());
        }
        for c in data.chunks(CHUNK) {
            self.send(peer, chan, c.to_vec())?;
        }
        Ok(())
    }

    pub fn recv(&self, peer: usize, chan: u8) -> Result<Vec<u8>> {
        self.recv_within(peer, chan, self.timeout)
    }

    /// [`Comm::recv`] with its own timeout.
    pub fn recv_within(&self, peer: usize, chan: u8, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.inbox.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(m) = st
                .queues
                .get_mut(&(peer, chan))
                .and_then(VecDeque::pop_front)
            {
                return Ok(m);
            }
            if let Some(f) = &st.failed {
                bail!("group broken: {f}");
            }
            if st.stopped.contains(&peer) {
                bail!("rank {peer} has stopped");
            }
            let now = Instant::now();
            if now >= deadline {
                let reason = format!(
                    "rank {peer} sent nothing for {timeout:?} (timeout waiting on channel {chan})"
                );
                st.failed = Some(reason.clone());
                self.inbox.cv.notify_all();
                bail!("group broken: {reason}");
            }
            st = self
                .inbox
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Receives `len` bytes sent with [`Comm::send_chunked`].
    pub fn recv_len(&self, peer: usize, chan: u8, len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        loop {
            let part = self.recv(peer, chan)?;
            out.extend_from_slice(&part);
            if out.len() >= len {
                break;
            }
        }
        if out.len() != len {
            bail!(
                "rank {peer} sent {} bytes, expected {len} on channel {chan}",
                out.len()
            );
        }
        Ok(out)
    }

    /// Uneven all-to-all: `bufs[peer]` goes to `peer`; returns what each peer sent us.
    pub fn all_to_all(&self, chan: u8, mut bufs: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if bufs.len() != self.world {
            bail!(
                "all_to_all needs {} buffers, got {}",
                self.world,
                bufs.len()
            );
        }
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); self.world];
        out[self.rank] = std::mem::take(&mut bufs[self.rank]);
        for off in 1..self.world {
            let peer = (self.rank + off) % self.world;
            self.send(peer, chan, std::mem::take(&mut bufs[peer]))?;
        }
        for off in 1..self.world {
            let peer = (self.rank + self.world - off) % self.world;
            out[peer] = self.recv(peer, chan)?;
        }
        Ok(out)
    }

    /// Every rank's `data`, by rank.
    pub fn all_gather(&self, chan: u8, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.all_to_all(chan, vec![data.to_vec(); self.world])
    }

    pub fn barrier(&self, chan: u8) -> Result<()> {
        self.all_gather(chan, &[]).map(|_| ())
    }

    /// A barrier that may wait up to `timeout` (e.g. for every rank to load its weights).
    pub fn barrier_within(&self, chan: u8, timeout: Duration) -> Result<()> {
        for off in 1..self.world {
            self.send((self.rank + off) % self.world, chan, Vec::new())?;
        }
        for off in 1..self.world {
            self.recv_within((self.rank + self.world - off) % self.world, chan, timeout)?;
        }
        Ok(())
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        for s in self.writers.iter().flatten() {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            let _ = s.shutdown(Shutdown::Both);
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::rendezvous::{Rendezvous, send_msg};
    use super::*;
    use crate::peer_auth::GroupKey;
    use std::net::{IpAddr, Ipv4Addr, TcpListener};

    pub(crate) fn rdv(rank: usize, world: usize, port: u16) -> RendezvousConfig {
        RendezvousConfig {
            rank,
            world,
            leader: Some(format!("127.0.0.1:{port}")),
            advertise: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            comm_port: if rank == 0 { port } else { 0 },
            timeout: Duration::from_secs(10),
            comm_timeout: Duration::from_secs(10),
            fingerprint: "f".into(),
            // Every group these tests form proves membership on every connection.
            group_key: Some(GroupKey::new("test-group").unwrap()),
        }
    }

    /// Forms a group of `world` ranks on loopback in threads.
    pub(crate) fn group(world: usize) -> Vec<(Comm, GroupInfo)> {
        let leader = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = leader.local_addr().unwrap().port();
        let mut leader = Some(leader);
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let cfg = rdv(r, world, port);
                let l = if r == 0 {
                    leader.take().unwrap()
                } else {
                    bind_listener(&cfg).unwrap()
                };
                std::thread::spawn(move || form_group(&cfg, l, None, random_unique_id).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn group_forms_and_exchanges() {
        let g = group(3);
        let epoch = g[0].1.epoch;
        assert!(
            g.iter()
                .all(|(_, i)| i.epoch == epoch && i.unique_id == g[0].1.unique_id)
        );
        let handles: Vec<_> = g
            .into_iter()
            .map(|(c, _)| {
                std::thread::spawn(move || {
                    let r = c.rank();
                    let bufs = (0..3).map(|p| vec![r as u8; p + r]).collect();
                    let got = c.all_to_all(CHAN_STEP, bufs).unwrap();
                    for (p, b) in got.iter().enumerate() {
                        assert_eq!(b, &vec![p as u8; p + r]);
                    }
                    let big = vec![r as u8; CHUNK * 2 + 5];
                    c.send_chunked((r + 1) % 3, CHAN_REMAP, &big).unwrap();
                    let got = c.recv_len((r + 2) % 3, CHAN_REMAP, CHUNK * 2 + 5).unwrap();
                    assert!(got.iter().all(|&b| b as usize == (r + 2) % 3));
                    c.barrier(CHAN_CTRL).unwrap();
                    c
                })
            })
            .collect();
        let comms: Vec<Comm> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        // Dropping rank 2 breaks the others' next receive with a reason.
        let mut comms = comms.into_iter();
        let c0 = comms.next().unwrap();
        let _c1 = comms.next().unwrap();
        drop(comms.next());
        let err = c0.recv(2, CHAN_STEP).unwrap_err().to_string();
        assert!(err.contains("rank 2"), "{err}");
    }

    #[test]
    fn rendezvous_times_out_with_the_missing_ranks() {
        let leader = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = leader.local_addr().unwrap().port();
        let mut cfg = rdv(0, 3, port);
        cfg.timeout = Duration::from_millis(300);
        let err = form_group(&cfg, leader, None, random_unique_id)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("[1, 2]"), "{err}");
        let mut cfg = rdv(1, 2, port);
        cfg.timeout = Duration::from_millis(300);
        let l = bind_listener(&cfg).unwrap();
        let err = form_group(&cfg, l, None, random_unique_id)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("could not reach rank 0"), "{err}");
    }

    #[test]
    fn a_rank_that_registers_again_replaces_its_dead_registration() {
        let leader = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = leader.local_addr().unwrap().port();
        let c0 = rdv(0, 3, port);
        let t = std::thread::spawn(move || form_group(&c0, leader, None, random_unique_id));
        // A first incarnation of rank 1 registers and dies while rank 2 is not there yet.
        let mut dead = TcpStream::connect(("127.0.0.1", port)).unwrap();
        send_msg(
            &mut dead,
            &Rendezvous::Register {
                rank: 1,
                world: 3,
                advertise: "127.0.0.1:9".into(),
                fingerprint: "f".into(),
                placement: None,
            },
        )
        .unwrap();
        drop(dead);
        std::thread::sleep(Duration::from_millis(100));
        let joins: Vec<_> = [1, 2]
            .into_iter()
            .map(|r| {
                let c = rdv(r, 3, port);
                let l = bind_listener(&c).unwrap();
                std::thread::spawn(move || form_group(&c, l, None, random_unique_id).unwrap())
            })
            .collect();
        let (comm0, info0) = t.join().unwrap().unwrap();
        let others: Vec<_> = joins.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(others.iter().all(|(_, i)| i.epoch == info0.epoch));
        comm0.send(1, CHAN_STEP, vec![7]).unwrap();
        assert_eq!(others[0].0.recv(0, CHAN_STEP).unwrap(), vec![7]);
    }

    #[test]
    fn mismatched_configuration_is_refused() {
        let leader = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = leader.local_addr().unwrap().port();
        let mut c0 = rdv(0, 2, port);
        c0.timeout = Duration::from_secs(2);
        let t = std::thread::spawn(move || form_group(&c0, leader, None, random_unique_id).err());
        let mut c1 = rdv(1, 2, port);
        c1.fingerprint = "other".into();
        let l = bind_listener(&c1).unwrap();
        let err = form_group(&c1, l, None, random_unique_id)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("different configuration"), "{err}");
        assert!(t.join().unwrap().is_some());
    }
}
