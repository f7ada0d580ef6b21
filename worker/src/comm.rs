//! Group formation (rendezvous) and the CPU communication backend over TCP.
//!
//! Rank 0 listens on its comm port; every other rank binds its own listener, registers with
//! rank 0 (retrying until the rendezvous deadline, so DNS names of pods that are not up yet are
//! fine), and receives the peer table, a fresh epoch and the NCCL unique id bytes. The ranks
//! then connect pairwise (rank i dials every rank 0 < j < i) into a full mesh.
//!
//! With a group key (the control token), both ends of every one of these connections first
//! prove they hold it ([`crate::peer_auth`]); a peer that cannot is refused with a log line
//! naming its address, and the rank keeps waiting for the real one. Without a key (local
//! runs) nothing is checked.
//!
//! Each link has a reader thread that drains frames into per-(peer, channel) queues, so
//! blocking writes never deadlock and a collective on one channel (the forward pass) runs
//! alongside a transfer on another (a remap's weights). A lost peer fails every waiting and
//! later receive with a reason.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use moe_api::PlacementDocument;

use crate::doorbell::Doorbell;
use crate::peer_auth::{self, GroupKey, NONCE_LEN};
use serde::{Deserialize, Serialize};

/// Channels multiplexed over each link.
pub const CHAN_STEP: u8 = 0;
pub const CHAN_CTRL: u8 = 1;
pub const CHAN_REMAP: u8 = 2;
const CHAN_RENDEZVOUS: u8 = 3;
/// A rank that gives up tells its peers why (best effort) before it closes its links.
const CHAN_ABORT: u8 = 4;
/// A rank that stops cleanly says so, so its closing link is not taken for a failure while
/// slower peers finish the same step boundary.
const CHAN_BYE: u8 = 5;

const MAX_FRAME: u64 = 1 << 34;
/// Large payloads (expert weights) travel in frames of this size, so step traffic interleaves.
pub const CHUNK: usize = 4 << 20;

fn write_frame(s: &mut TcpStream, chan: u8, data: &[u8]) -> io::Result<()> {
    let mut header = [0u8; 9];
    header[0] = chan;
    header[1..].copy_from_slice(&(data.len() as u64).to_le_bytes());
    s.write_all(&header)?;
    s.write_all(data)
}

fn read_frame(s: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
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

#[derive(Debug, Serialize, Deserialize)]
enum Rendezvous {
    Register {
        rank: usize,
        world: usize,
        advertise: String,
        fingerprint: String,
        placement: Option<PlacementDocument>,
    },
    Table {
        epoch: u64,
        unique_id: Vec<u8>,
        peers: Vec<String>,
        placement: Option<PlacementDocument>,
    },
    Refused {
        reason: String,
    },
    Hello {
        epoch: u64,
        rank: usize,
    },
    /// First message of each end when the group has a key: who it is and its fresh nonce
    /// (hex).
    Challenge {
        rank: usize,
        nonce: String,
    },
    /// The answer to the other end's challenge (hex HMAC, see [`peer_auth`]).
    Proof {
        mac: String,
    },
}

impl Rendezvous {
    fn kind(&self) -> &'static str {
        match self {
            Rendezvous::Register { .. } => "Register",
            Rendezvous::Table { .. } => "Table",
            Rendezvous::Refused { .. } => "Refused",
            Rendezvous::Hello { .. } => "Hello",
            Rendezvous::Challenge { .. } => "Challenge",
            Rendezvous::Proof { .. } => "Proof",
        }
    }
}

fn send_msg(s: &mut TcpStream, m: &Rendezvous) -> Result<()> {
    write_frame(s, CHAN_RENDEZVOUS, &serde_json::to_vec(m)?)?;
    Ok(())
}

fn recv_msg(s: &mut TcpStream, deadline: Instant) -> Result<Rendezvous> {
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let (chan, data) = read_frame(s)?;
    if chan != CHAN_RENDEZVOUS {
        bail!("unexpected frame on channel {chan} during rendezvous");
    }
    Ok(serde_json::from_slice(&data)?)
}

/// What a rank needs to join its group.
#[derive(Debug, Clone)]
pub struct RendezvousConfig {
    pub rank: usize,
    pub world: usize,
    /// `host:port` of rank 0 (unused by rank 0).
    pub leader: Option<String>,
    /// IP to bind listeners to and to advertise (None: all interfaces; advertise the address
    /// used to reach the leader).
    pub advertise: Option<IpAddr>,
    pub comm_port: u16,
    pub timeout: Duration,
    pub comm_timeout: Duration,
    /// Configuration summary that must be equal on all ranks.
    pub fingerprint: String,
    /// The group's shared secret: every connection proves it (None: no check, local use).
    pub group_key: Option<GroupKey>,
}

/// With a key: both ends of `s` prove they hold it; returns the rank the peer proved it
/// speaks for. Both ends send their challenge before reading, so neither waits on the other.
fn prove_membership(
    s: &mut TcpStream,
    key: &GroupKey,
    my_rank: usize,
    deadline: Instant,
) -> Result<usize> {
    let mine = peer_auth::nonce();
    send_msg(
        s,
        &Rendezvous::Challenge {
            rank: my_rank,
            nonce: peer_auth::to_hex(&mine),
        },
    )?;
    let (their_rank, theirs) = match recv_msg(s, deadline)? {
        Rendezvous::Challenge { rank, nonce } => (rank, peer_auth::from_hex(&nonce)?),
        Rendezvous::Refused { reason } => bail!("it refused this rank: {reason}"),
        other => bail!(
            "it sent {} without proving membership of the group (does it have the group's control token?)",
            other.kind()
        ),
    };
    // A peer that claims this rank's own id or echoes this rank's nonce could reflect this
    // rank's answer back as its own.
    if their_rank == my_rank || theirs == mine || theirs.len() != NONCE_LEN {
        bail!(
            "its challenge is malformed (rank {their_rank}, {} byte nonce)",
            theirs.len()
        );
    }
    send_msg(
        s,
        &Rendezvous::Proof {
            mac: peer_auth::to_hex(&key.proof(&theirs, &mine, my_rank, their_rank)),
        },
    )?;
    let proof = match recv_msg(s, deadline)? {
        Rendezvous::Proof { mac } => peer_auth::from_hex(&mac)?,
        Rendezvous::Refused { reason } => bail!("it refused this rank: {reason}"),
        other => bail!("it answered the challenge with {}", other.kind()),
    };
    if !key.verify(&proof, &mine, &theirs, my_rank, their_rank) {
        let _ = send_msg(
            s,
            &Rendezvous::Refused {
                reason: format!(
                    "rank {my_rank} could not verify the proof of group membership: the ranks hold different control tokens"
                ),
            },
        );
        bail!("its proof of membership of the group is wrong (it holds another control token)");
    }
    Ok(their_rank)
}

/// The peer's address for log lines.
fn peer_name(s: &TcpStream) -> String {
    s.peer_addr()
        .map_or_else(|_| "an unknown address".into(), |a| a.to_string())
}

/// What the group agreed on at formation.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    pub epoch: u64,
    pub unique_id: Vec<u8>,
    pub peers: Vec<String>,
    /// The newest placement any rank brought (rank 0 chooses; every rank uses it).
    pub placement: Option<PlacementDocument>,
}

/// Binds this rank's comm listener (on the advertise address when given).
pub fn bind_listener(cfg: &RendezvousConfig) -> Result<TcpListener> {
    let ip = cfg.advertise.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let addr = SocketAddr::new(ip, cfg.comm_port);
    TcpListener::bind(addr).with_context(|| format!("binding the comm listener on {addr}"))
}

fn accept_until(listener: &TcpListener, deadline: Instant) -> Result<Option<TcpStream>> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// 128 fresh random bytes (the CPU backend's stand-in for an NCCL unique id).
pub fn random_unique_id() -> Vec<u8> {
    (0..16).flat_map(|_| random_u64().to_le_bytes()).collect()
}

/// Forms the group: returns the connected [`Comm`] and what the group agreed on.
pub fn form_group(
    cfg: &RendezvousConfig,
    listener: TcpListener,
    placement: Option<PlacementDocument>,
    make_unique_id: impl FnOnce() -> Vec<u8>,
) -> Result<(Comm, GroupInfo)> {
    let deadline = Instant::now() + cfg.timeout;
    let mut links: Vec<Option<TcpStream>> = (0..cfg.world).map(|_| None).collect();
    let info = if cfg.world == 1 {
        GroupInfo {
            epoch: random_u64(),
            unique_id: make_unique_id(),
            peers: vec![listener.local_addr()?.to_string()],
            placement,
        }
    } else if cfg.rank == 0 {
        lead(
            cfg,
            &listener,
            placement,
            make_unique_id,
            deadline,
            &mut links,
        )?
    } else {
        join(cfg, &listener, placement, deadline, &mut links)?
    };
    drop(listener);
    let comm = Comm::new(cfg.rank, cfg.world, links, cfg.comm_timeout)?;
    Ok((comm, info))
}

fn lead(
    cfg: &RendezvousConfig,
    listener: &TcpListener,
    placement: Option<PlacementDocument>,
    make_unique_id: impl FnOnce() -> Vec<u8>,
    deadline: Instant,
    links: &mut [Option<TcpStream>],
) -> Result<GroupInfo> {
    let mut peers = vec![String::new(); cfg.world];
    peers[0] = listener.local_addr()?.to_string();
    let mut best = placement;
    let mut registered = 1;
    loop {
        if registered == cfg.world {
            // Drop registrations whose process died meanwhile (a restarted pod registers again).
            for (rank, link) in links.iter_mut().enumerate() {
                if link.as_ref().is_some_and(|s| !alive(s)) {
                    tracing::warn!(rank, "registered rank went away; waiting for it again");
                    *link = None;
                    registered -= 1;
                }
            }
            if registered == cfg.world {
                break;
            }
        }
        let Some(mut s) = accept_until(listener, deadline)? else {
            let missing: Vec<usize> = (1..cfg.world).filter(|&r| links[r].is_none()).collect();
            bail!(
                "rendezvous timed out after {:?}: ranks {missing:?} did not register with rank 0",
                cfg.timeout
            );
        };
        // One connection may not hold up the rendezvous for long.
        let until = deadline.min(Instant::now() + Duration::from_secs(10));
        let proven = match &cfg.group_key {
            None => None,
            Some(key) => match prove_membership(&mut s, key, 0, until) {
                Ok(rank) => Some(rank),
                Err(e) => {
                    tracing::warn!(peer = %peer_name(&s), "refusing a rendezvous peer that cannot prove it belongs to the group: {e:#}");
                    continue;
                }
            },
        };
        let msg = match recv_msg(&mut s, until) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(peer = %peer_name(&s), "ignoring a rendezvous connection: {e:#}");
                continue;
            }
        };
        if let Rendezvous::Challenge { .. } = msg {
            let reason = "rank 0 has no control token but this rank has one: give every rank the same --control-token-file".to_string();
            tracing::warn!(peer = %peer_name(&s), "refusing a registration: {reason}");
            let _ = send_msg(&mut s, &Rendezvous::Refused { reason });
            continue;
        }
        let Rendezvous::Register {
            rank,
            world,
            advertise,
            fingerprint,
            placement,
        } = msg
        else {
            continue;
        };
        let refuse = if proven.is_some_and(|p| p != rank) {
            Some(format!(
                "the peer proved membership as rank {} but registers as rank {rank}",
                proven.unwrap_or_default()
            ))
        } else if world != cfg.world {
            Some(format!(
                "rank {rank} says the world size is {world}, rank 0 says {}",
                cfg.world
            ))
        } else if rank == 0 || rank >= cfg.world {
            Some(format!("rank {rank} is out of range 1..{}", cfg.world))
        } else if fingerprint != cfg.fingerprint {
            Some(format!(
                "rank {rank} has a different configuration: `{fingerprint}` vs rank 0's `{}`",
                cfg.fingerprint
            ))
        } else {
            None
        };
        if let Some(reason) = refuse {
            tracing::warn!(peer = %peer_name(&s), "refusing a registration: {reason}");
            let _ = send_msg(&mut s, &Rendezvous::Refused { reason });
            continue;
        }
        if let Some(p) = placement
            && best.as_ref().is_none_or(|b| p.generation > b.generation)
        {
            best = Some(p);
        }
        tracing::info!(rank, %advertise, "rank registered");
        peers[rank] = advertise;
        // A rank that registers again (its pod restarted during the rendezvous) replaces its
        // earlier, now dead, registration.
        if links[rank].replace(s).is_none() {
            registered += 1;
        } else {
            tracing::warn!(rank, "rank registered again; keeping the newer connection");
        }
    }
    let info = GroupInfo {
        epoch: random_u64(),
        unique_id: make_unique_id(),
        peers: peers.clone(),
        placement: best,
    };
    let table = Rendezvous::Table {
        epoch: info.epoch,
        unique_id: info.unique_id.clone(),
        peers,
        placement: info.placement.clone(),
    };
    for s in links.iter_mut().flatten() {
        send_msg(s, &table)?;
    }
    Ok(info)
}

/// False when the peer closed or reset the connection (a non-blocking peek).
fn alive(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    let ok = match s.peek(&mut b) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    };
    ok && s.set_nonblocking(false).is_ok()
}

fn connect_leader(cfg: &RendezvousConfig, deadline: Instant) -> Result<TcpStream> {
    let leader = cfg
        .leader
        .as_deref()
        .ok_or_else(|| anyhow!("no leader address"))?;
    let mut last = String::from("never tried");
    loop {
        match leader.to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                        Ok(mut s) => {
                            s.set_nodelay(true)?;
                            let Some(key) = &cfg.group_key else {
                                return Ok(s);
                            };
                            let until = deadline.min(Instant::now() + Duration::from_secs(10));
                            match prove_membership(&mut s, key, cfg.rank, until) {
                                Ok(0) => return Ok(s),
                                Ok(r) => last = format!("{a} answered as rank {r}, not rank 0"),
                                Err(e) => {
                                    // Not rank 0 of this group (or a stale pod of another):
                                    // keep looking for the real one.
                                    tracing::warn!(peer = %a, "refusing a rendezvous peer that cannot prove it is rank 0 of the group: {e:#}");
                                    last = format!(
                                        "{a} could not prove it belongs to the group: {e:#}"
                                    );
                                }
                            }
                        }
                        Err(e) => last = format!("connecting to {a}: {e}"),
                    }
                }
            }
            Err(e) => last = format!("resolving {leader}: {e}"),
        }
        if Instant::now() >= deadline {
            bail!(
                "rendezvous timed out after {:?}: could not reach rank 0 at {leader} ({last})",
                cfg.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn join(
    cfg: &RendezvousConfig,
    listener: &TcpListener,
    placement: Option<PlacementDocument>,
    deadline: Instant,
    links: &mut [Option<TcpStream>],
) -> Result<GroupInfo> {
    let mut leader = connect_leader(cfg, deadline)?;
    let ip = match cfg.advertise {
        Some(ip) => ip,
        None => leader.local_addr()?.ip(),
    };
    let advertise = SocketAddr::new(ip, listener.local_addr()?.port()).to_string();
    send_msg(
        &mut leader,
        &Rendezvous::Register {
            rank: cfg.rank,
            world: cfg.world,
            advertise,
            fingerprint: cfg.fingerprint.clone(),
            placement,
        },
    )?;
    let (epoch, unique_id, peers, placement) = match recv_msg(&mut leader, deadline) {
        Ok(Rendezvous::Table {
            epoch,
            unique_id,
            peers,
            placement,
        }) => (epoch, unique_id, peers, placement),
        Ok(Rendezvous::Refused { reason }) => bail!("rank 0 refused this rank: {reason}"),
        Ok(Rendezvous::Challenge { .. }) => bail!(
            "rank 0 asks for proof of membership of the group but this rank has no control token: give every rank the same --control-token-file"
        ),
        Ok(other) => bail!("unexpected rendezvous message {other:?}"),
        Err(e) => bail!(
            "rendezvous timed out after {:?} waiting for rank 0's peer table: {e:#}",
            cfg.timeout
        ),
    };
    if peers.len() != cfg.world {
        bail!(
            "peer table has {} entries for {} ranks",
            peers.len(),
            cfg.world
        );
    }
    links[0] = Some(leader);
    for (j, peer) in peers.iter().enumerate().take(cfg.rank).skip(1) {
        let addr: SocketAddr = peer
            .parse()
            .with_context(|| format!("peer address of rank {j}: {peer}"))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connecting to rank {j} at {addr}"))?;
        s.set_nodelay(true)?;
        if let Some(key) = &cfg.group_key {
            // The address came from rank 0, which proved itself; a failure here is a real fault.
            let rank = prove_membership(&mut s, key, cfg.rank, deadline).with_context(|| {
                format!("rank {j} at {addr} could not prove it belongs to the group")
            })?;
            if rank != j {
                bail!("the peer at {addr} proved membership as rank {rank}, not rank {j}");
            }
        }
        send_msg(
            &mut s,
            &Rendezvous::Hello {
                epoch,
                rank: cfg.rank,
            },
        )?;
        links[j] = Some(s);
    }
    let mut expected = cfg.world - 1 - cfg.rank;
    while expected > 0 {
        let Some(mut s) = accept_until(listener, deadline)? else {
            let missing: Vec<usize> = (cfg.rank + 1..cfg.world)
                .filter(|&r| links[r].is_none())
                .collect();
            bail!(
                "rendezvous timed out after {:?}: ranks {missing:?} did not connect",
                cfg.timeout
            );
        };
        let until = deadline.min(Instant::now() + Duration::from_secs(10));
        let proven = match &cfg.group_key {
            None => None,
            Some(key) => match prove_membership(&mut s, key, cfg.rank, until) {
                Ok(rank) => Some(rank),
                Err(e) => {
                    tracing::warn!(peer = %peer_name(&s), "refusing a peer that cannot prove it belongs to the group: {e:#}");
                    continue;
                }
            },
        };
        match recv_msg(&mut s, until) {
            Ok(Rendezvous::Hello { epoch: e, rank })
                if e == epoch
                    && rank > cfg.rank
                    && rank < cfg.world
                    && links[rank].is_none()
                    && proven.is_none_or(|p| p == rank) =>
            {
                links[rank] = Some(s);
                expected -= 1;
            }
            Ok(other) => {
                tracing::warn!(peer = %peer_name(&s), "ignoring a peer connection that sent {}", other.kind())
            }
            Err(e) => tracing::warn!(peer = %peer_name(&s), "ignoring a peer connection: {e:#}"),
        }
    }
    Ok(GroupInfo {
        epoch,
        unique_id,
        peers,
        placement,
    })
}

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
    use super::*;

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
