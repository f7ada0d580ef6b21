//! Rendezvous with a group key: the ranks prove membership to each other, and a peer holding
//! another token (or none) is refused while the group keeps waiting for the real rank.

use std::net::{Ipv4Addr, TcpListener};
use std::thread::JoinHandle;
use std::time::Duration;

use moe_worker::comm::{GroupInfo, RendezvousConfig, form_group};
use moe_worker::peer_auth::GroupKey;

fn listener() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap()
}

fn config(
    rank: usize,
    world: usize,
    leader: &str,
    l: &TcpListener,
    token: Option<&str>,
    timeout: Duration,
) -> RendezvousConfig {
    RendezvousConfig {
        rank,
        world,
        leader: Some(leader.to_string()),
        advertise: Some(Ipv4Addr::LOCALHOST.into()),
        comm_port: l.local_addr().unwrap().port(),
        timeout,
        comm_timeout: Duration::from_secs(10),
        fingerprint: "auth-test".into(),
        group_key: token.map(|t| GroupKey::new(t).unwrap()),
    }
}

/// Starts a rank in a thread; its result is the group it formed (and leaves) or the error.
fn spawn_rank(
    rank: usize,
    world: usize,
    leader: &str,
    token: Option<&str>,
    timeout: Duration,
    l: TcpListener,
) -> JoinHandle<Result<GroupInfo, String>> {
    let cfg = config(rank, world, leader, &l, token, timeout);
    std::thread::spawn(move || match form_group(&cfg, l, None, Vec::new) {
        Ok((comm, info)) => {
            comm.goodbye();
            Ok(info)
        }
        Err(e) => Err(format!("{e:#}")),
    })
}

#[test]
fn a_group_with_a_shared_token_forms() {
    let world = 3;
    let ls: Vec<TcpListener> = (0..world).map(|_| listener()).collect();
    let leader = ls[0].local_addr().unwrap().to_string();
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            spawn_rank(
                rank,
                world,
                &leader,
                Some("group-token"),
                Duration::from_secs(20),
                l,
            )
        })
        .collect();
    let infos: Vec<GroupInfo> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert!(infos.iter().all(|i| i.epoch == infos[0].epoch));
}

/// An impostor with another token claims rank 1 before the real rank 1 arrives: rank 0 refuses
/// it and the group forms with the real rank 1.
#[test]
fn a_peer_with_another_token_is_refused_and_the_group_still_forms() {
    let world = 3;
    let ls: Vec<TcpListener> = (0..world).map(|_| listener()).collect();
    let leader = ls[0].local_addr().unwrap().to_string();
    let mut ls = ls.into_iter();
    let token = Some("group-token");
    let long = Duration::from_secs(20);
    let rank0 = spawn_rank(0, world, &leader, token, long, ls.next().unwrap());
    // The impostors give up after a short while (they keep retrying rank 0 until then).
    let short = Duration::from_secs(2);
    let wrong = spawn_rank(1, world, &leader, Some("another-token"), short, listener());
    let tokenless = spawn_rank(2, world, &leader, None, short, listener());
    let wrong = wrong
        .join()
        .unwrap()
        .expect_err("the wrong token joined the group");
    assert!(
        wrong.contains("could not prove") && wrong.contains("rendezvous timed out"),
        "{wrong}"
    );
    let tokenless = tokenless
        .join()
        .unwrap()
        .expect_err("a rank without token joined the group");
    assert!(tokenless.contains("has no control token"), "{tokenless}");
    // The real ranks still form the group with rank 0, which kept waiting.
    let rest: Vec<_> = (1..world)
        .map(|rank| spawn_rank(rank, world, &leader, token, long, ls.next().unwrap()))
        .collect();
    let leader_info = rank0.join().unwrap().unwrap();
    for h in rest {
        assert_eq!(h.join().unwrap().unwrap().epoch, leader_info.epoch);
    }
}

/// Without the real rank, a rank 0 with a key never takes an impostor for it: the rendezvous
/// times out naming the missing rank.
#[test]
fn rank_0_does_not_accept_an_impostor_in_place_of_a_missing_rank() {
    let (l0, l1) = (listener(), listener());
    let leader = l0.local_addr().unwrap().to_string();
    let timeout = Duration::from_secs(3);
    let rank0 = spawn_rank(0, 2, &leader, Some("group-token"), timeout, l0);
    let impostor = spawn_rank(1, 2, &leader, Some("guess"), timeout, l1);
    let err = rank0
        .join()
        .unwrap()
        .expect_err("rank 0 formed a group with the impostor");
    assert!(err.contains("ranks [1] did not register"), "{err}");
    assert!(impostor.join().unwrap().is_err());
}

/// A joining rank refuses a "rank 0" that cannot prove membership and keeps looking for the
/// real one at the same address.
#[test]
fn a_rank_does_not_join_a_leader_with_another_token() {
    let (l0, l1) = (listener(), listener());
    let leader = l0.local_addr().unwrap().to_string();
    // The fake rank 0 outlasts rank 1's attempts, so every attempt meets it.
    let fake_leader = spawn_rank(0, 2, &leader, Some("other"), Duration::from_secs(4), l0);
    let rank1 = spawn_rank(
        1,
        2,
        &leader,
        Some("group-token"),
        Duration::from_secs(2),
        l1,
    );
    let err = rank1
        .join()
        .unwrap()
        .expect_err("rank 1 joined the wrong leader");
    assert!(
        err.contains("could not prove it belongs to the group"),
        "{err}"
    );
    assert!(fake_leader.join().unwrap().is_err());
}
