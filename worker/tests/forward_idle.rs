//! An idle group serving the forward API does not spin: with nothing queued its engines sleep
//! on their doorbells, and a request at either rank wakes the whole group. Alone in its test
//! binary, so the process's CPU time is the group's.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use half::bf16;
use moe_api::forward::Tensor;
use moe_api::forward::client::Stream;

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    assert_eq!(rc, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_group_uses_no_cpu_and_wakes_on_a_request_at_any_rank() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen3_moe");
    let g = start_group(2, |_| {
        strings(&["--traffic", "api", "--weights", dir.to_str().unwrap()])
    })
    .await;
    g.wait_ready().await;
    let x = Tensor::Bf16(vec![bf16::from_f32(0.5); 64]);
    let streams = [
        Stream::connect(&format!("http://{}", g.workers[0].forward_addr), None)
            .await
            .unwrap(),
        Stream::connect(&format!("http://{}", g.workers[1].forward_addr), None)
            .await
            .unwrap(),
    ];
    streams[0].forward(1, 64, x.clone(), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (c0, t0) = (cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu, wall) = (cpu_time() - c0, t0.elapsed());
    let share = cpu.as_secs_f64() / wall.as_secs_f64();
    // A spinning engine would use a whole core (100%); sleeping ones wake once a second.
    assert!(
        share < 0.02,
        "idle group used {cpu:?} of CPU in {wall:?} ({:.2}% of a core)",
        share * 100.0
    );

    // A request at either rank wakes the group at once, not after the idle wait's 1 s
    // timeout (a lost wakeup would show as a delay spread over that second).
    for i in 0..10u64 {
        let r = (i % 2) as usize;
        tokio::time::sleep(Duration::from_millis(50 + 37 * i)).await;
        let t = Instant::now();
        streams[r].forward(2, 64, x.clone(), None).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "rank {r}: a request after idling took {:?}",
            t.elapsed()
        );
    }
    g.stop().await;
}
