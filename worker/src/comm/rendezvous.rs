//! Group formation: rank 0 leads (collects registrations, hands out the peer table, a fresh
//! epoch and the unique id), every other rank joins it, then the ranks connect pairwise into a
//! full mesh, each connection proving group membership when a key is set.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use moe_api::PlacementDocument;
use serde::{Deserialize, Serialize};

use super::Comm;
use super::frame::{CHAN_RENDEZVOUS, read_frame, write_frame};
use crate::peer_auth::{self, GroupKey, NONCE_LEN};

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Rendezvous {
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

pub(super) fn send_msg(s: &mut TcpStream, m: &Rendezvous) -> Result<()> {
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
