//! `moe-forward-bench`: the forward API's per-layer round trip against the same layer run
//! in-process, in one run (docs/benchmarks/forward-api-cpu.md).
//!
//! Starts an in-process 2-rank CPU group serving the forward API (`--traffic api`, synthetic
//! weights) and, beside it, a bare 2-rank group of the same model that calls the per-layer
//! path (`CpuExec::moe_layer`, two all-to-alls over the same TCP comm) directly. For every
//! clients x rows configuration it measures round-trip p50/p99 and rows/s through the pipelined
//! stream and through `POST /v1/forward` (clients spread over both ranks, one request in flight
//! each), and the in-process call with the same rows; then the idle group's CPU use. Prints a
//! markdown table.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use clap::Parser;
use half::bf16;
use moe_api::forward::Tensor;
use moe_api::forward::client::{Client, Stream};
use moe_kernels::Matrix;
use moe_worker::comm::{RendezvousConfig, form_group};
use moe_worker::config::{Args, Config, InitialPlacement};
use moe_worker::exec::CpuExec;
use moe_worker::placement::initial_placement;
use moe_worker::weights::WeightStore;
use moe_worker::{Hooks, Worker};

#[derive(Debug, Parser)]
#[command(name = "moe-forward-bench")]
struct Bench {
    #[arg(long, default_value_t = 16)]
    experts: usize,
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    #[arg(long, default_value_t = 256)]
    intermediate: usize,
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Concurrent clients (comma-separated).
    #[arg(long, default_value = "1,4,16", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Rows per request (comma-separated).
    #[arg(long, default_value = "1,16,256,4096", value_delimiter = ',')]
    rows: Vec<usize>,
    /// Seconds each turn of a measurement runs (at least `min_requests` per client).
    #[arg(long, default_value_t = 0.3)]
    seconds: f64,
    #[arg(long, default_value_t = 3)]
    min_requests: usize,
    /// Turns each measurement takes (stream, simple, in-process, stream, ...).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Seconds of idle CPU measurement.
    #[arg(long, default_value_t = 5.0)]
    idle_seconds: f64,
}

fn worker_args(b: &Bench, rank: usize, leader: u16) -> Vec<String> {
    [
        "moe-worker",
        "--rank",
        &rank.to_string(),
        "--world-size",
        "2",
        "--leader-addr",
        &format!("127.0.0.1:{leader}"),
        "--comm-port",
        &if rank == 0 { leader } else { 0 }.to_string(),
        "--http-port",
        "0",
        "--advertise-addr",
        "127.0.0.1",
        "--backend",
        "cpu",
        "--traffic",
        "api",
        "--num-layers",
        "1",
        "--num-experts",
        &b.experts.to_string(),
        "--hidden",
        &b.hidden.to_string(),
        "--intermediate",
        &b.intermediate.to_string(),
        "--top-k",
        &b.top_k.to_string(),
        "--max-request-rows",
        "4096",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn start_group(b: &Bench) -> Result<Vec<Worker>> {
    let leader = TcpListener::bind("127.0.0.1:0")?;
    let port = leader.local_addr()?.port();
    let mut leader = Some(leader);
    let mut workers = Vec::new();
    for r in 0..2 {
        let config = Config::from_args(Args::try_parse_from(worker_args(b, r, port))?)?;
        let hooks = Hooks {
            comm_listener: if r == 0 { leader.take() } else { None },
            ..Hooks::default()
        };
        workers.push(moe_worker::start(config, hooks).await?);
    }
    for w in &workers {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !w.shared.is_ready() {
            if Instant::now() > deadline {
                return Err(anyhow!("the group did not become ready"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(workers)
}

/// The in-process reference: a bare 2-rank group calling `CpuExec::moe_layer` directly; rank 0
/// has the rows, rank 1 takes part with none (as an idle rank of the API group does).
struct InProcess {
    /// (rows, calls, where the per-call durations go).
    requests: mpsc::Sender<(usize, usize, mpsc::Sender<Vec<Duration>>)>,
}

impl InProcess {
    fn start(b: &Bench) -> Result<InProcess> {
        let listeners: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<Result<_, _>>()?;
        let leader = listeners[0].local_addr()?.to_string();
        let config = Config::from_args(Args::try_parse_from(worker_args(b, 0, 1))?)?;
        let shape = config.shape;
        let store = WeightStore::from_config(&config)?;
        let placement =
            initial_placement(InitialPlacement::Linear, &shape, 1).map_err(|e| anyhow!(e))?;
        let (tx0, rx0) = mpsc::channel::<(usize, usize, mpsc::Sender<Vec<Duration>>)>();
        let (tx1, rx1) = mpsc::channel::<usize>();
        let mut rx0 = Some(rx0);
        let mut rx1 = Some(rx1);
        for (rank, l) in listeners.into_iter().enumerate() {
            let exec = CpuExec::load(&store, &placement, &shape, rank)?;
            let cfg = RendezvousConfig {
                rank,
                world: 2,
                leader: Some(leader.clone()),
                advertise: Some(Ipv4Addr::LOCALHOST.into()),
                comm_port: l.local_addr()?.port(),
                timeout: Duration::from_secs(30),
                comm_timeout: Duration::from_secs(300),
                fingerprint: "forward-bench".into(),
                group_key: None,
            };
            let h = shape.hidden;
            let slots = shape.num_slots();
            let (requests, calls) = if rank == 0 {
                (rx0.take(), None)
            } else {
                (None, rx1.take())
            };
            let tx1 = tx1.clone();
            std::thread::spawn(move || {
                let r = (|| -> Result<()> {
                    let (comm, _) = form_group(&cfg, l, None, Vec::new)?;
                    let mut counts = vec![0u32; slots];
                    let mut run = |t: usize, seed: u64| -> Result<Duration> {
                        let x = Matrix::from_vec(t, h, rows(t, h, seed))?;
                        let t0 = Instant::now();
                        exec.moe_layer(&comm, 0, &x, None, seed as u32, &mut counts)?;
                        Ok(t0.elapsed())
                    };
                    match (requests, calls) {
                        (Some(requests), _) => {
                            for (t, n, reply) in requests {
                                tx1.send(n)?;
                                let d = (0..n).map(|i| run(t, i as u64)).collect::<Result<_>>()?;
                                let _ = reply.send(d);
                            }
                        }
                        (None, Some(calls)) => {
                            for n in calls {
                                for i in 0..n {
                                    run(0, i as u64)?;
                                }
                            }
                        }
                        (None, None) => {}
                    }
                    comm.goodbye();
                    Ok(())
                })();
                if let Err(e) = r {
                    eprintln!("in-process rank {rank}: {e:#}");
                }
            });
        }
        Ok(InProcess { requests: tx0 })
    }

    /// Durations of `n` in-process calls of `t` rows.
    fn measure(&self, t: usize, n: usize) -> Result<Vec<Duration>> {
        let (tx, rx) = mpsc::channel();
        self.requests.send((t, n, tx))?;
        Ok(rx.recv()?)
    }
}

/// Deterministic rows of unit scale.
fn rows(t: usize, h: usize, seed: u64) -> Vec<bf16> {
    (0..t * h)
        .map(|i| {
            let v = moe_worker::placement::splitmix64(seed.wrapping_mul(0x9E37) ^ i as u64);
            bf16::from_f32(((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Stream,
    Simple,
}

/// Latencies of every request, and the rows and seconds of the runs.
#[derive(Default)]
struct Measured {
    lat: Vec<Duration>,
    rows: usize,
    secs: f64,
}

impl Measured {
    fn add(&mut self, other: Measured) {
        self.lat.extend(other.lat);
        self.rows += other.rows;
        self.secs += other.secs;
    }
    fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.secs.max(1e-9)
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

async fn run_clients(
    b: &Bench,
    endpoints: &[String],
    transport: Transport,
    clients: usize,
    t: usize,
) -> Result<Measured> {
    let h = b.hidden;
    let budget = Duration::from_secs_f64(b.seconds);
    let min = b.min_requests;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let ep = endpoints[c % endpoints.len()].clone();
        tasks.push(tokio::spawn(async move {
            let x = Tensor::Bf16(rows(t, h, c as u64));
            let mut lat = Vec::new();
            let mut stream = None;
            let mut simple = None;
            match transport {
                Transport::Stream => stream = Some(Stream::connect(&ep, None).await?),
                Transport::Simple => simple = Some(Client::connect(&ep, None).await?),
            }
            while lat.len() < min || start.elapsed() < budget {
                let t0 = Instant::now();
                match (&stream, &mut simple) {
                    (Some(s), _) => s.forward(0, h, x.clone(), None).await?,
                    (None, Some(c)) => c.forward(0, h, x.clone(), None).await?,
                    _ => unreachable!(),
                };
                lat.push(t0.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for task in tasks {
        lat.extend(task.await??);
    }
    Ok(Measured {
        rows: lat.len() * t,
        secs: start.elapsed().as_secs_f64(),
        lat,
    })
}

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let b = Bench::parse();
    let workers = start_group(&b).await?;
    let endpoints: Vec<String> = workers
        .iter()
        .map(|w| format!("http://{}", w.forward_addr))
        .collect();
    let inproc = InProcess::start(&b)?;
    println!(
        "model: 1 MoE layer, {} experts, hidden {}, intermediate {}, top-{}; 2 CPU ranks on loopback; \
         clients spread over both ranks, one request in flight each",
        b.experts, b.hidden, b.intermediate, b.top_k
    );
    println!();
    println!(
        "| clients | rows | in-process p50 / p99 (µs) | stream p50 / p99 (µs) | stream added p50 | simple p50 / p99 (µs) | simple added p50 | in-process rows/s | stream rows/s | simple rows/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &t in &b.rows {
        for &c in &b.clients {
            // Warm-up: connections, allocations.
            run_clients(&b, &endpoints, Transport::Stream, c, t)
                .await
                .ok();
            // The three measurements take turns, so a change of load on the machine (it is
            // shared) hits all three alike.
            let (mut s, mut p) = (Measured::default(), Measured::default());
            let (mut ip, mut ip_rows, mut ip_secs) = (Vec::new(), 0usize, 0.0f64);
            for _ in 0..b.repeats {
                s.add(run_clients(&b, &endpoints, Transport::Stream, c, t).await?);
                p.add(run_clients(&b, &endpoints, Transport::Simple, c, t).await?);
                // In-process: the same rows per call, about as many calls as one stream
                // client made in its turn.
                let n = (s.lat.len() / c / b.repeats).clamp(b.min_requests, 2000);
                let t0 = Instant::now();
                ip.extend(inproc.measure(t, n)?);
                ip_secs += t0.elapsed().as_secs_f64();
                ip_rows += n * t;
            }
            let ip_rows = ip_rows as f64 / ip_secs;
            let (s_rows, p_rows) = (s.rows_per_s(), p.rows_per_s());
            let ip50 = pct(&mut ip, 0.5);
            let ip99 = pct(&mut ip, 0.99);
            let (s50, s99) = (pct(&mut s.lat, 0.5), pct(&mut s.lat, 0.99));
            let (p50, p99) = (pct(&mut p.lat, 0.5), pct(&mut p.lat, 0.99));
            let added = |x: Duration| {
                let d = x.as_secs_f64() - ip50.as_secs_f64();
                format!(
                    "{:+.0} µs ({:+.0}%)",
                    d * 1e6,
                    100.0 * d / ip50.as_secs_f64().max(1e-9)
                )
            };
            println!(
                "| {c} | {t} | {} / {} | {} / {} | {} | {} / {} | {} | {:.0} | {:.0} | {:.0} |",
                us(ip50),
                us(ip99),
                us(s50),
                us(s99),
                added(s50),
                us(p50),
                us(p99),
                added(p50),
                ip_rows,
                s_rows,
                p_rows
            );
        }
    }
    // Idle: nothing queued, connections open.
    let _keep = Stream::connect(&endpoints[0], None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (c0, t0) = (cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(b.idle_seconds)).await;
    let (cpu, wall) = (cpu_time() - c0, t0.elapsed());
    println!();
    println!(
        "idle: {:.1} ms of CPU in {:.1} s for the whole process (both API ranks and the in-process group) = {:.3}% of one core",
        cpu.as_secs_f64() * 1e3,
        wall.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    );
    for w in &workers {
        w.request_stop();
    }
    for w in workers {
        w.wait().await?;
    }
    drop(inproc);
    Ok(())
}
