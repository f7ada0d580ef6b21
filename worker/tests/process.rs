//! The `moe-worker` binary as separate processes on loopback: a killed rank takes the group
//! down with a reason, a group that cannot form exits non-zero, bad flags are named.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_moe-worker");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn worker(rank: usize, world: usize, leader_port: u16, http_port: u16, extra: &[&str]) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("MOE_RANK", rank.to_string())
        .env("MOE_WORLD_SIZE", world.to_string())
        .env("MOE_LEADER_ADDR", format!("localhost:{leader_port}"))
        .env(
            "MOE_COMM_PORT",
            if rank == 0 { leader_port } else { 0 }.to_string(),
        )
        .env("MOE_HTTP_PORT", http_port.to_string())
        .env("MOE_ADVERTISE_ADDR", "127.0.0.1")
        .env("MOE_BACKEND", "cpu")
        .env("MOE_NUM_LAYERS", "2")
        .env("MOE_NUM_EXPERTS", "6")
        .env("MOE_HIDDEN", "16")
        .env("MOE_INTERMEDIATE", "16")
        .env("MOE_TRAFFIC_TOKENS_PER_STEP", "8")
        .env("MOE_TRAFFIC_STEPS_PER_SECOND", "100")
        .env("MOE_COMM_TIMEOUT_SECONDS", "10")
        .env("MOE_RENDEZVOUS_TIMEOUT_SECONDS", "20")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.spawn().expect("spawn moe-worker")
}

fn wait_exit(child: &mut Child, within: Duration) -> (i32, String) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut err);
            }
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {within:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The whole HTTP/1.1 response to `GET path` on a local port (`None` when nothing answers).
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    Some(buf)
}

fn http_ready(port: u16) -> bool {
    http_get(port, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
}

#[test]
fn killing_a_rank_makes_the_others_exit_with_a_reason() {
    let leader = free_port();
    let http: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut children: Vec<Child> = (0..3).map(|r| worker(r, 3, leader, http[r], &[])).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http.iter().all(|&p| http_ready(p)) {
        assert!(Instant::now() < deadline, "group never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    children[2].kill().unwrap();
    let _ = children[2].wait();
    for (r, child) in children.iter_mut().enumerate().take(2) {
        let (code, err) = wait_exit(child, Duration::from_secs(30));
        assert_ne!(code, 0, "rank {r} exited 0:\n{err}");
        assert!(
            err.contains("rank 2"),
            "rank {r} should name the lost rank:\n{err}"
        );
    }
}

#[test]
fn a_group_that_cannot_form_exits_non_zero() {
    let leader = free_port();
    let mut child = worker(
        1,
        2,
        leader,
        free_port(),
        &["--rendezvous-timeout-seconds", "1"],
    );
    let (code, err) = wait_exit(&mut child, Duration::from_secs(30));
    assert_ne!(code, 0);
    assert!(err.contains("rendezvous timed out"), "{err}");
    assert!(err.contains("could not reach rank 0"), "{err}");
}

#[test]
fn invalid_flags_are_named() {
    let mut child = worker(3, 2, free_port(), free_port(), &[]);
    let (code, err) = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(code, 2);
    assert!(err.contains("--rank") && err.contains("MOE_RANK"), "{err}");
    let mut child = worker(
        0,
        4,
        free_port(),
        free_port(),
        &["--redundant-experts", "1"],
    );
    let (code, err) = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(code, 2);
    assert!(err.contains("--redundant-experts"), "{err}");
    // A checkpoint of an architecture the worker does not know: exit 2 before the group forms.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#,
    )
    .unwrap();
    let weights = dir.path().to_string_lossy().into_owned();
    let mut child = worker(0, 1, free_port(), free_port(), &["--weights", &weights]);
    let (code, err) = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--weights") && err.contains("unknown architecture `LlamaForCausalLM`"),
        "{err}"
    );
}

#[test]
fn sigterm_stops_the_whole_group_cleanly() {
    let leader = free_port();
    let http: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let mut children: Vec<Child> = (0..2).map(|r| worker(r, 2, leader, http[r], &[])).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http.iter().all(|&p| http_ready(p)) {
        assert!(Instant::now() < deadline, "group never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = children[1].id().to_string();
    let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(ok.success());
    for (r, child) in children.iter_mut().enumerate() {
        let (code, err) = wait_exit(child, Duration::from_secs(30));
        assert_eq!(code, 0, "rank {r}:\n{err}");
    }
}

/// `n` pairs of consecutive ports, all free and distinct (a process with two local ranks
/// listens on port and port + 1). Every candidate is held open until all are chosen, so no two
/// pairs overlap.
fn free_port_pairs(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p < u16::MAX
            && let Ok(b) = TcpListener::bind(("127.0.0.1", p + 1))
        {
            ports.push(p);
            held.push(b);
        }
        held.push(a);
    }
    ports
}

fn http_body(port: u16, path: &str) -> Option<String> {
    Some(http_get(port, path)?.split_once("\r\n\r\n")?.1.to_string())
}

fn status_rank(port: u16) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(&http_body(port, "/v1/status")?).ok()?;
    v.get("rank")?.as_u64()
}

#[test]
fn several_ranks_per_process_form_one_group() {
    // World 4 as 2 processes x 2 ranks, the second one placed by its process index (how a pod
    // ordinal would place it). Fixed ports for every rank (a rank on port 0 could be handed one of the others).
    let [leader, comm_b, http_a, http_b] = free_port_pairs(4)[..] else {
        unreachable!()
    };
    let comm_b = comm_b.to_string();
    let http = [http_a, http_b];
    let mut a = worker(
        0,
        4,
        leader,
        http[0],
        &["--local-ranks", "2", "--num-experts", "8"],
    );
    let mut b = worker(
        0,
        4,
        leader,
        http[1],
        &[
            "--local-ranks",
            "2",
            "--process-index",
            "1",
            "--num-experts",
            "8",
            "--comm-port",
            comm_b.as_str(),
        ],
    );
    let ports = [http[0], http[0] + 1, http[1], http[1] + 1];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ports.iter().all(|&p| http_ready(p)) {
        for c in [&mut a, &mut b] {
            if let Some(s) = c.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = c.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("a worker process exited early ({s}):\n{err}");
            }
        }
        assert!(Instant::now() < deadline, "group never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (rank, &p) in ports.iter().enumerate() {
        assert_eq!(status_rank(p), Some(rank as u64), "port {p}");
    }
    // One scrape of a process's first rank covers both of its ranks.
    let text = http_body(http[1], "/metrics").unwrap();
    for series in [
        "moe_worker_ready{rank=\"2\"} 1",
        "moe_worker_ready{rank=\"3\"} 1",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }
    assert_eq!(text.matches("# TYPE moe_worker_ready gauge").count(), 1);
    // SIGTERM to one process stops the whole group, both processes with exit code 0.
    let pid = b.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    for (name, child) in [("a", &mut a), ("b", &mut b)] {
        let (code, err) = wait_exit(child, Duration::from_secs(30));
        assert_eq!(code, 0, "process {name}:\n{err}");
    }
}

#[test]
fn a_local_rank_that_cannot_start_ends_the_process_promptly() {
    // Rank 1's HTTP port (http + 1) is taken: the process must exit non-zero naming it, without
    // waiting for rank 0's rendezvous to time out (20 s here).
    // The pairs are free when chosen but not reserved: a test running beside this one may take
    // a port in between, so choose again until http + 1 can be held here.
    let (leader, http, _taken) = (0..50)
        .find_map(|_| {
            let [leader, http] = free_port_pairs(2)[..] else {
                unreachable!()
            };
            let taken = TcpListener::bind(("0.0.0.0", http + 1)).ok()?;
            Some((leader, http, taken))
        })
        .expect("a free port pair whose http + 1 can be held");
    let mut p = worker(
        0,
        4,
        leader,
        http,
        &["--local-ranks", "2", "--num-experts", "8"],
    );
    let t0 = Instant::now();
    let (code, err) = wait_exit(&mut p, Duration::from_secs(15));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("rank 1"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
}
