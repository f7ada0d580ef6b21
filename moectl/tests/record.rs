//! `moectl record` against a real worker group: two CPU ranks of `moe_worker` started in this
//! process on loopback, serving synthetic traffic. The recording must equal the ranks' own
//! windows summed, continue where it stopped, and replay in `moectl backtest`.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use moe_api::LoadReport;
use moe_worker::config::{Args, Config};
use moe_worker::{Hooks, Worker};

const WORLD: usize = 2;

fn config(rank: usize, leader_port: u16) -> Config {
    let argv = [
        "moe-worker",
        "--rank",
        &rank.to_string(),
        "--world-size",
        &WORLD.to_string(),
        "--leader-addr",
        &format!("127.0.0.1:{leader_port}"),
        "--comm-port",
        &if rank == 0 { leader_port } else { 0 }.to_string(),
        "--http-port",
        "0",
        "--advertise-addr",
        "127.0.0.1",
        "--num-layers",
        "2",
        "--num-experts",
        "8",
        "--redundant-experts",
        "4",
        "--hidden",
        "16",
        "--intermediate",
        "24",
        "--top-k",
        "2",
        "--traffic-tokens-per-step",
        "16",
        "--traffic-skew",
        "1.3",
        "--traffic-seed",
        "5",
        "--traffic-steps-per-second",
        "200",
        // A window every 40 steps: one every 0.2 s, the newest 16 kept for 3.2 s.
        "--stats-window",
        "40",
        "--weights",
        "synthetic:11",
    ];
    Config::from_args(Args::try_parse_from(argv).expect("arguments parse")).expect("valid config")
}

async fn start_group() -> Vec<Worker> {
    let leader = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = leader.local_addr().unwrap().port();
    let mut leader = Some(leader);
    let mut workers = Vec::new();
    for r in 0..WORLD {
        let hooks = Hooks {
            comm_listener: if r == 0 { leader.take() } else { None },
            ..Hooks::default()
        };
        workers.push(
            moe_worker::start(config(r, port), hooks)
                .await
                .expect("worker starts"),
        );
    }
    let client = reqwest::Client::new();
    for w in &workers {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !client
            .get(format!("http://{}/readyz", w.http_addr))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(Instant::now() < deadline, "the group never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    workers
}

/// `moectl args`, run off the runtime's threads (the workers keep serving meanwhile).
async fn run(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        moectl(&a)
    })
    .await
    .unwrap()
}

fn record_args(urls: &[String], output: &str, windows: usize) -> Vec<String> {
    let mut v = vec!["record".to_string()];
    for u in urls {
        v.extend(["--worker".to_string(), u.clone()]);
    }
    v.extend(
        [
            "--output",
            output,
            "--windows",
            &windows.to_string(),
            "--poll-seconds",
            "0.1",
            "--idle-seconds",
            "60",
        ]
        .map(String::from),
    );
    v
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn recording(path: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_sums_the_ranks_windows_continues_and_replays() {
    let d = Dir::new("record");
    let workers = start_group().await;
    let urls: Vec<String> = workers
        .iter()
        .map(|w| format!("http://{}", w.http_addr))
        .collect();
    let out = d.path("recorded.json");

    // Windows of the past are left out of a new recording (which placement served them is not
    // known): wait until the ranks keep two, then the first recorded begins after this step.
    let rank0 = |path: &str| {
        let url = format!("{}/v1/{path}", urls[0]);
        async move {
            reqwest::get(url)
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    while rank0("load?history=16").await["history"]
        .as_array()
        .map_or(0, Vec::len)
        < 2
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let step_before = rank0("status").await["step"].as_u64().unwrap();
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let began = unix_now();

    let o = run(record_args(&urls, &out, 3)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("now holds 3 windows"), "{}", stderr(&o));
    let first = recording(&out);
    assert_eq!(first["windows"].as_array().unwrap().len(), 3);
    let first_start = first["endSteps"][0].as_u64().unwrap() - first["steps"][0].as_u64().unwrap();
    assert!(
        first_start >= step_before,
        "the first window begins at step {first_start}, before the recording ({step_before})"
    );
    // A new recording keeps the placement the group serves (rank 0's) as its start.
    let served: serde_json::Value = reqwest::get(format!("{}/v1/placement", urls[0]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["placement"], served);

    // Continued: two more, the first three kept, every window right after the one before.
    let o = run(record_args(&urls, &out, 5)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let rec = recording(&out);
    let windows: Vec<Vec<Vec<f64>>> = serde_json::from_value(rec["windows"].clone()).unwrap();
    let ends: Vec<u64> = serde_json::from_value(rec["endSteps"].clone()).unwrap();
    let steps: Vec<u64> = serde_json::from_value(rec["steps"].clone()).unwrap();
    assert_eq!(windows.len(), 5);
    assert_eq!(
        rec["windows"].as_array().unwrap()[..3],
        first["windows"].as_array().unwrap()[..]
    );
    for w in 1..5 {
        assert_eq!(
            ends[w] - steps[w],
            ends[w - 1],
            "window {w} does not follow"
        );
    }
    assert_eq!(steps, vec![40; 5]);
    assert!(rec["gaps"].as_array().unwrap().is_empty());
    assert_eq!(
        rec["placement"], first["placement"],
        "a continued recording keeps its start"
    );
    // The clock that dates the windows: rank 0's step and the time at each poll that added
    // windows, both growing, the step past the windows that poll added, the time within this
    // test; kept across the continued recording.
    let clock: Vec<[f64; 2]> = serde_json::from_value(rec["clock"].clone()).unwrap();
    let first_clock: Vec<[f64; 2]> = serde_json::from_value(first["clock"].clone()).unwrap();
    assert!(
        !first_clock.is_empty() && clock.len() > first_clock.len(),
        "{clock:?}"
    );
    assert_eq!(clock[..first_clock.len()], first_clock[..]);
    assert!(
        clock
            .windows(2)
            .all(|p| p[1][0] > p[0][0] && p[1][1] > p[0][1]),
        "{clock:?}"
    );
    let now = unix_now();
    assert!(
        clock.iter().all(|&[_, t]| t >= began && t <= now),
        "{clock:?}"
    );
    // Read before the windows were asked for: past the start of the first it added.
    assert!(
        clock[0][0] >= (ends[0] - steps[0]) as f64,
        "{clock:?} {ends:?}"
    );

    // Each recorded window is the two ranks' windows of that end step, summed.
    let mut reports = Vec::new();
    for u in &urls {
        let r: LoadReport = reqwest::get(format!("{u}/v1/load?history=16"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        reports.push(r);
    }
    let oldest_kept = reports.iter().map(|r| r.history[0].end_step).max().unwrap();
    let mut compared = 0;
    for (w, &end) in ends.iter().enumerate().filter(|(_, e)| **e >= oldest_kept) {
        let mut sum = vec![vec![0.0; 8]; 2];
        for r in &reports {
            let e = r.history.iter().find(|e| e.end_step == end).unwrap();
            for (row, add) in sum.iter_mut().zip(&e.logical_counts) {
                for (x, y) in row.iter_mut().zip(add) {
                    *x += y;
                }
            }
        }
        assert_eq!(windows[w], sum, "window ending at step {end}");
        // Every token goes to top-k = 2 experts in each of 2 layers, from 16 per step per rank.
        let total: f64 = sum[0].iter().sum();
        assert_eq!(total, (2 * 16 * 40 * WORLD) as f64);
        compared += 1;
    }
    assert!(compared >= 1, "no recorded window still kept by the ranks");

    // The recording replays as any recorded trace does. Without the flags the layout and the
    // start come from the recording: the same replay as with the flags and the placement given
    // by hand.
    let start = d.file("start.json", &rec["placement"].to_string());
    let by_hand = run(args(&[
        "backtest",
        "--load",
        &out,
        "--ranks",
        "2",
        "--redundant",
        "4",
        "--previous",
        &start,
        "--history",
        "1,2",
    ]))
    .await;
    assert!(by_hand.status.success(), "{}", stderr(&by_hand));
    let recorded = run(args(&["backtest", "--load", &out, "--history", "1,2"])).await;
    assert!(recorded.status.success(), "{}", stderr(&recorded));
    assert!(
        stdout(&recorded).contains("| policy | H = 1 | H = 2 |"),
        "{}",
        stdout(&recorded)
    );
    assert!(
        stderr(&recorded).contains("every replay starts from the placement the group served"),
        "{}",
        stderr(&recorded)
    );
    assert_eq!(stdout(&recorded), stdout(&by_hand));
    // Another layout than the recording's: no recorded start.
    let other = run(args(&[
        "backtest",
        "--load",
        &out,
        "--ranks",
        "4",
        "--history",
        "1",
    ]))
    .await;
    assert!(
        other.status.success() && stderr(&other).contains("is not this replay's layout"),
        "{}",
        stderr(&other)
    );

    // One rank is not the group; the same rank twice neither; a file that is not a recording is
    // kept as it is; an address where no worker answers is given up on, with the last error.
    let o = run(record_args(&urls[..1], &d.path("half.json"), 1)).await;
    assert_bad(&o, "rank 1 of the group's 2 has no --worker");
    assert!(!std::path::Path::new(&d.path("half.json")).exists());
    let o = run(record_args(
        &[urls[0].clone(), urls[0].clone()],
        &d.path("twice.json"),
        1,
    ))
    .await;
    assert_bad(&o, "are both rank 0");
    let taken = d.file("taken.json", "[[1, 2]]");
    let o = run(record_args(&urls, &taken, 1)).await;
    assert_bad(&o, "is not a moectl recording");
    assert_eq!(std::fs::read_to_string(&taken).unwrap(), "[[1, 2]]");
    let o = run(args(&["backtest", "--load", &taken])).await;
    assert_bad(&o, "--ranks: give the EP ranks");
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut args = record_args(&[nobody], &d.path("nobody.json"), 1);
    let idle = args.iter().position(|a| a == "--idle-seconds").unwrap();
    args[idle + 1] = "1".into();
    let o = run(args).await;
    // Each failed poll warns first ("trying again"); the error is the last line.
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("(trying again)"), "{err}");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: no new window for 1 s; last error: GET http://127.0.0.1:"),
        "{err}"
    );

    workers[0].request_stop();
    for w in workers {
        tokio::time::timeout(Duration::from_secs(60), w.wait())
            .await
            .expect("the group stops")
            .expect("no rank failed");
    }
}
