//! `moectl plan`'s placement output (`--format placement`), written straight from the plan.
//!
//! The three integer tables (`phy2log`, `log2phy`, `logcnt`) are almost all of the bytes:
//! 580 KB on a DeepSeek-V3 shape, mostly `log2phy`'s padding. serde_json hands every number
//! and comma to its writer separately, a copy call per token, and writing them took as long as
//! `greedy`'s planning. They are formatted here byte by byte; every other field goes through
//! serde_json, so the file is byte for byte what serde_json would write for the same fields (a
//! test checks it against serde_json's output of a struct with those fields).
//!
//! The bytes go to the file in chunks of [`CHUNK`] through one small buffer, not gathered
//! whole first: a buffer the size of the file is fresh memory, a page fault for every 4 KB
//! written (145 for the 580 KB file, about 1.4 us each on the 2-core VM).

use std::io::{self, Write};

use eplb::{Placement, Plan, Shape};
use serde::Serialize;

/// Bytes gathered before they go to the sink.
const CHUNK: usize = 64 * 1024;

/// Writes the plan as moectl's placement JSON (one line, UTF-8, no newline) to `sink`.
pub fn write_plan_json(plan: &Plan, shape: &Shape, sink: &mut dyn Write) -> io::Result<()> {
    let p = &plan.placement;
    let layers = &plan.layers;
    let mut o = JsonObject::new(sink);
    o.field("algorithm", &plan.algorithm)?;
    o.field("num_layers", &p.num_layers)?;
    o.field("num_logical_experts", &p.num_logical_experts)?;
    o.field("num_redundant", &shape.num_redundant)?;
    o.field("num_ranks", &p.num_ranks)?;
    o.field("num_nodes", &p.num_nodes)?;
    o.field("num_groups", &shape.num_groups)?;
    o.key("phy2log");
    o.table(p.phy2log.iter().map(|row| row.iter().copied()))?;
    o.key("log2phy");
    log2phy(&mut o, p)?;
    o.key("logcnt");
    o.table(p.logcnt().iter().map(|row| row.iter().copied()))?;
    o.field("par", &plan.predicted_par())?;
    o.field("mean_par", &plan.mean_par())?;
    o.field("worst_par", &plan.worst_par())?;
    let objective: Vec<f64> = layers.iter().map(|l| l.objective).collect();
    let lower_bound: Vec<Option<f64>> = layers.iter().map(|l| l.lower_bound).collect();
    let optimal: Vec<bool> = layers.iter().map(|l| l.optimal).collect();
    let proven_gap: Vec<Option<f64>> = layers.iter().map(|l| l.proven_gap).collect();
    o.field("objective", &objective)?;
    o.field("lower_bound", &lower_bound)?;
    o.field("optimal", &optimal)?;
    o.field("proven_gap", &proven_gap)?;
    o.field("changed_layers", &plan.changed_layers)?;
    o.field("slots_moved", &plan.slots_moved)?;
    o.finish()
}

/// `Placement::log2phy` (`[layer][expert][k]`, slots ascending, padded with -1), formatted as
/// it is computed, one layer at a time. The padding, most of the file, is copied in one piece
/// per expert.
fn log2phy(o: &mut JsonObject<'_>, p: &Placement) -> io::Result<()> {
    let width = p.max_replicas();
    let experts = p.num_logical_experts;
    // At least a fixed copy's worth (see `push_prefix`).
    let padding = "-1,".repeat(width.max(FIXED.div_ceil(3)));
    let mut slots: Vec<Vec<usize>> = vec![Vec::with_capacity(width); experts];
    o.out.push(b'[');
    for (l, row) in p.phy2log.iter().enumerate() {
        slots.iter_mut().for_each(Vec::clear);
        for (slot, &e) in row.iter().enumerate() {
            if let Some(s) = slots.get_mut(e).filter(|s| s.len() < width) {
                s.push(slot);
            }
        }
        let out = &mut o.out;
        if l > 0 {
            out.push(b',');
        }
        out.push(b'[');
        for (e, s) in slots.iter().enumerate() {
            if e > 0 {
                out.push(b',');
            }
            out.push(b'[');
            // Every entry with a comma after it; the last comma becomes the `]` (`width` is at
            // least 1, so there is one).
            for &slot in s {
                push_with_comma(out, slot);
            }
            push_prefix(out, padding.as_bytes(), 3 * (width - s.len()));
            close_row(out);
        }
        out.push(b']');
        o.pass_on()?;
    }
    o.out.push(b']');
    Ok(())
}

/// A JSON object written field by field, compact as `serde_json::to_string`, through a
/// buffer that is passed on to the sink whenever it holds [`CHUNK`] bytes.
struct JsonObject<'a> {
    out: Vec<u8>,
    sink: &'a mut dyn Write,
    first: bool,
}

impl<'a> JsonObject<'a> {
    fn new(sink: &'a mut dyn Write) -> JsonObject<'a> {
        // Room for a chunk and the row that crosses its end.
        let mut out = Vec::with_capacity(CHUNK + CHUNK / 4);
        out.push(b'{');
        JsonObject {
            out,
            sink,
            first: true,
        }
    }

    /// Gives the sink what the buffer holds once it holds a chunk.
    fn pass_on(&mut self) -> io::Result<()> {
        if self.out.len() >= CHUNK {
            self.sink.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }

    /// `"name":`, after a comma unless it is the first field. Names are plain identifiers
    /// (no escaping needed).
    fn key(&mut self, name: &str) {
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn field<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> io::Result<()> {
        self.key(name);
        serde_json::to_writer(&mut self.out, value)?;
        self.pass_on()
    }

    /// `[[1,2],[3]]` from rows of integers.
    fn table<R: Iterator<Item = usize>>(
        &mut self,
        rows: impl Iterator<Item = R>,
    ) -> io::Result<()> {
        self.out.push(b'[');
        for (i, row) in rows.enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.out.push(b'[');
            for x in row {
                push_with_comma(&mut self.out, x);
            }
            close_row(&mut self.out);
            self.pass_on()?;
        }
        self.out.push(b']');
        Ok(())
    }

    fn finish(mut self) -> io::Result<()> {
        self.out.push(b'}');
        self.sink.write_all(&self.out)
    }
}

/// `x` and a comma. Most numbers here have 1-3 digits: those are one 4-byte copy from a table
/// and a cut back to their length, no branch on the digits and no copy call (a copy of a length
/// known at compile time is a store; serde_json's integer writer and a byte per push each cost
/// more than the digits).
fn push_with_comma(out: &mut Vec<u8>, x: usize) {
    match DIGITS_AND_COMMA.get(x) {
        Some(bytes) => {
            out.extend_from_slice(bytes);
            let length = 2 + usize::from(x >= 10) + usize::from(x >= 100);
            out.truncate(out.len() - 4 + length);
        }
        None => {
            out.extend_from_slice(x.to_string().as_bytes());
            out.push(b',');
        }
    }
}

/// `x,` for every `x` below 1000, padded to 4 bytes.
const DIGITS_AND_COMMA: [[u8; 4]; 1000] = {
    let mut table = [[0u8; 4]; 1000];
    let mut x = 0;
    while x < 1000 {
        let digits = [(x / 100) as u8, (x / 10 % 10) as u8, (x % 10) as u8];
        let skip = if x >= 100 {
            0
        } else if x >= 10 {
            1
        } else {
            2
        };
        let mut i = 0;
        while i + skip < 3 {
            table[x][i] = b'0' + digits[i + skip];
            i += 1;
        }
        table[x][i] = b',';
        x += 1;
    }
    table
};

/// The bytes of a fixed-length copy in [`push_prefix`].
const FIXED: usize = 32;

/// `bytes[..n]` appended. Up to [`FIXED`] bytes (and `bytes` as long) they are copied as
/// [`FIXED`] bytes, a few stores, and cut back: a copy of a length known only at run time is a
/// call, one per expert of the `log2phy` padding.
fn push_prefix(out: &mut Vec<u8>, bytes: &[u8], n: usize) {
    match bytes.first_chunk::<FIXED>() {
        Some(fixed) if n <= FIXED => {
            out.extend_from_slice(fixed);
            out.truncate(out.len() - FIXED + n);
        }
        _ => out.extend_from_slice(&bytes[..n]),
    }
}

/// Ends a row written with a comma after every entry: the last comma becomes `]`, or an empty
/// row gets one.
fn close_row(out: &mut Vec<u8>) {
    match out.last_mut() {
        Some(last) if *last == b',' => *last = b']',
        _ => out.push(b']'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eplb::synth::{TraceSpec, generate};
    use eplb::{LoadHistory, PlanRequest, planner_by_name};

    /// The fields in file order, for serde_json to write (the test's oracle: the form this
    /// output had before it was written by hand).
    #[derive(Serialize)]
    struct SerdeForm<'a> {
        algorithm: &'a str,
        num_layers: usize,
        num_logical_experts: usize,
        num_redundant: usize,
        num_ranks: usize,
        num_nodes: usize,
        num_groups: usize,
        phy2log: &'a [Vec<usize>],
        log2phy: Vec<Vec<Vec<i64>>>,
        logcnt: Vec<Vec<usize>>,
        par: Vec<f64>,
        mean_par: f64,
        worst_par: f64,
        objective: Vec<f64>,
        lower_bound: Vec<Option<f64>>,
        optimal: Vec<bool>,
        proven_gap: Vec<Option<f64>>,
        changed_layers: &'a [usize],
        slots_moved: usize,
    }

    #[test]
    fn integers_read_back() {
        let mut out = b"[".to_vec();
        let numbers: Vec<usize> = (0..1200).chain([4096, usize::MAX]).collect();
        for &x in &numbers {
            push_with_comma(&mut out, x);
        }
        close_row(&mut out);
        assert_eq!(out, serde_json::to_vec(&numbers).unwrap());
        let mut empty = b"[".to_vec();
        close_row(&mut empty);
        assert_eq!(empty, b"[]");
    }

    #[test]
    fn prefixes_of_any_length() {
        let bytes: Vec<u8> = (0..100).collect();
        for source in [&bytes[..], &bytes[..FIXED], &bytes[..5]] {
            for n in 0..=source.len() {
                let mut out = vec![7];
                push_prefix(&mut out, source, n);
                assert_eq!(out[1..], source[..n]);
                assert_eq!(out[0], 7);
            }
        }
    }

    /// `log2phy` of experts without a replica (not a valid placement, but its fields are
    /// public) and of an empty placement: as serde_json writes `Placement::log2phy`.
    #[test]
    fn log2phy_pads_like_serde_json() {
        // Experts 1 and 3 without a replica, expert 0 twice; then experts 0-3 in 20, 11, 9 and
        // no slots: padding of 0, 27, 33 and 60 bytes, within and past one fixed copy.
        let mut p = Placement {
            num_layers: 1,
            num_logical_experts: 4,
            num_ranks: 1,
            num_nodes: 1,
            phy2log: vec![vec![0, 0, 2]],
        };
        let wide = [vec![0; 20], vec![1; 11], vec![2; 9]].concat();
        for layers in [p.phy2log.clone(), Vec::new(), vec![wide.clone(), wide]] {
            p.phy2log = layers;
            p.num_layers = p.phy2log.len();
            let mut sink = Vec::new();
            let mut o = JsonObject::new(&mut sink);
            log2phy(&mut o, &p).unwrap();
            let written = String::from_utf8(o.out[1..].to_vec()).unwrap();
            assert_eq!(written, serde_json::to_string(&p.log2phy()).unwrap());
        }
    }

    /// What serde_json writes for the plan's fields, the form this output had before it was
    /// written by hand.
    fn serde_json_form(plan: &Plan, shape: &Shape) -> String {
        let p = &plan.placement;
        let layers = &plan.layers;
        serde_json::to_string(&SerdeForm {
            algorithm: &plan.algorithm,
            num_layers: p.num_layers,
            num_logical_experts: p.num_logical_experts,
            num_redundant: shape.num_redundant,
            num_ranks: p.num_ranks,
            num_nodes: p.num_nodes,
            num_groups: shape.num_groups,
            phy2log: &p.phy2log,
            log2phy: p.log2phy(),
            logcnt: p.logcnt(),
            par: plan.predicted_par(),
            mean_par: plan.mean_par(),
            worst_par: plan.worst_par(),
            objective: layers.iter().map(|l| l.objective).collect(),
            lower_bound: layers.iter().map(|l| l.lower_bound).collect(),
            optimal: layers.iter().map(|l| l.optimal).collect(),
            proven_gap: layers.iter().map(|l| l.proven_gap).collect(),
            changed_layers: &plan.changed_layers,
            slots_moved: plan.slots_moved,
        })
        .unwrap()
    }

    fn plan(algorithm: &str, shape: Shape, spec: &TraceSpec) -> Plan {
        let history = LoadHistory::new(generate(spec)).unwrap();
        planner_by_name(algorithm)
            .unwrap()
            .plan(&PlanRequest::new(shape, &history))
            .unwrap()
    }

    /// A sink that keeps every write apart, to see the chunks.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The file is what serde_json writes for the same fields, byte for byte, on plans with
    /// and without proofs, bounds and replicas, written in one piece (small plans) or in
    /// chunks (a DeepSeek-V3-sized one).
    #[test]
    fn writes_what_serde_json_writes() {
        let small = TraceSpec::new(3, 16, 2, 4, 7);
        for (algorithm, shape, spec, pieces) in [
            ("greedy", Shape::new(16, 8, 8, 2, 1).unwrap(), &small, 1..=1),
            ("joint", Shape::new(16, 4, 4, 1, 1).unwrap(), &small, 1..=1),
            ("joint", Shape::new(16, 0, 4, 1, 1).unwrap(), &small, 1..=1),
            (
                "greedy",
                Shape::new(256, 32, 32, 4, 1).unwrap(),
                &TraceSpec::new(58, 256, 8, 2, 7),
                5..=usize::MAX,
            ),
        ] {
            let plan = plan(algorithm, shape, spec);
            let mut writes = Writes::default();
            write_plan_json(&plan, &shape, &mut writes).unwrap();
            let Writes(writes) = writes;
            assert!(pieces.contains(&writes.len()), "{} pieces", writes.len());
            // Every piece but the last is a chunk and at most one table row more.
            for w in &writes[..writes.len() - 1] {
                assert!((CHUNK..CHUNK + CHUNK / 4).contains(&w.len()), "{}", w.len());
            }
            let written = String::from_utf8(writes.concat()).unwrap();
            assert_eq!(
                written,
                serde_json_form(&plan, &shape),
                "{algorithm} {shape:?}"
            );
        }
    }

    /// A sink that fails: the error comes back, no panic, nothing more is written after it.
    #[test]
    fn a_failing_sink_fails_the_write() {
        struct Full(usize);
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                self.0 += 1;
                Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let shape = Shape::new(256, 32, 32, 4, 1).unwrap();
        let plan = plan("greedy", shape, &TraceSpec::new(58, 256, 8, 2, 7));
        let mut sink = Full(0);
        let e = write_plan_json(&plan, &shape, &mut sink).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        assert_eq!(sink.0, 1);
    }
}
