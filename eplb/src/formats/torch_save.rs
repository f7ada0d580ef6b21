//! A reader for the one kind of `torch.save` file this project consumes: a dict of plain
//! values and integer or float tensors (SGLang's expert-distribution dump).
//!
//! `torch.save` (PyTorch's `torch/serialization.py`, zip format, the default since 1.6) writes
//! a zip archive with `<name>/data.pkl` (a pickle, protocol 2 by default), one entry
//! `<name>/data/<key>` per tensor storage with the raw little-endian elements, and
//! `<name>/byteorder`. In the pickle a tensor is
//! `torch._utils._rebuild_tensor_v2(persistent_id, storage_offset, size, stride, ...)` where
//! `persistent_id` = `("storage", torch.<Type>Storage, key, location, numel)`. This reader runs
//! only the pickle opcodes such a file uses and builds no Python objects: a global call stays
//! a [`Pickled::Call`], and tensors are materialised from their storage on request. Anything
//! else (other opcodes, big-endian storages, unknown storage types) is refused with an error.

use std::collections::HashMap;
use std::io::{Cursor, Read};

use crate::error::{EplbError, Result};

fn terr<T>(m: String) -> Result<T> {
    Err(EplbError::Load(format!("torch.save file: {m}")))
}

/// A value from the pickle, unevaluated.
#[derive(Debug, Clone, PartialEq)]
pub enum Pickled {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Pickled>),
    List(Vec<Pickled>),
    Dict(Vec<(Pickled, Pickled)>),
    /// `module.name`.
    Global(String, String),
    /// A persistent id (torch: a storage reference).
    PersistentId(Box<Pickled>),
    /// `callable(*args)`, not evaluated.
    Call(Box<Pickled>, Box<Pickled>),
    /// `obj.__setstate__(state)` (BUILD), not evaluated.
    Build(Box<Pickled>, Box<Pickled>),
}

impl Pickled {
    /// The value under a string key of a dict.
    pub fn get(&self, key: &str) -> Option<&Pickled> {
        match self {
            Pickled::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, Pickled::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    fn as_int(&self) -> Option<i64> {
        match self {
            Pickled::Int(i) => Some(*i),
            _ => None,
        }
    }
}

/// A tensor's elements as f64, row-major, with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// A parsed `torch.save` file: the pickled object and the raw storages by key.
pub struct TorchFile {
    pub root: Pickled,
    storages: HashMap<String, Vec<u8>>,
}

impl TorchFile {
    /// Parses the archive and runs the pickle.
    pub fn parse(bytes: &[u8]) -> Result<TorchFile> {
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
            .map_err(|e| {
                EplbError::Load(format!(
                    "torch.save file: not a readable zip archive ({e}): the file is truncated or damaged (copy it again), or not a torch.save file"
                ))
            })?;
        let names: Vec<String> = zip
            .file_names()
            .map(|n| n.map(|c| c.into_owned()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| EplbError::Load(format!("torch.save file: bad entry name: {e}")))?;
        let Some(pkl) = names
            .iter()
            .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        else {
            return terr("no data.pkl in the archive (a legacy non-zip torch.save file?)".into());
        };
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let read = |zip: &mut zip::ZipArchive<Cursor<&[u8]>>, name: &str| -> Result<Vec<u8>> {
            let mut f = zip
                .by_name(name)
                .map_err(|e| EplbError::Load(format!("torch.save file: {name}: {e}")))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)
                .map_err(|e| EplbError::Load(format!("torch.save file: {name}: {e}")))?;
            Ok(buf)
        };
        if names.iter().any(|n| *n == format!("{prefix}byteorder")) {
            let order = read(&mut zip, &format!("{prefix}byteorder"))?;
            if order.trim_ascii() != b"little" {
                return terr("big-endian storages are not supported".into());
            }
        }
        let pickle = read(&mut zip, pkl)?;
        let root = Machine::default().run(&pickle)?;
        let mut storages = HashMap::new();
        let data_prefix = format!("{prefix}data/");
        for n in &names {
            if let Some(key) = n.strip_prefix(&data_prefix) {
                storages.insert(key.to_string(), read(&mut zip, n)?);
            }
        }
        Ok(TorchFile { root, storages })
    }

    /// Materialises a `_rebuild_tensor_v2` call as a tensor of f64.
    pub fn tensor(&self, v: &Pickled, what: &str) -> Result<Tensor> {
        let Pickled::Call(f, args) = v else {
            return terr(format!("{what} is not a tensor"));
        };
        match f.as_ref() {
            Pickled::Global(m, n) if m == "torch._utils" && n == "_rebuild_tensor_v2" => {}
            other => return terr(format!("{what} is built by {other:?}, not a plain tensor")),
        }
        let Pickled::Tuple(a) = args.as_ref() else {
            return terr(format!("{what}: bad tensor arguments"));
        };
        let (
            Some(Pickled::PersistentId(pid)),
            Some(offset),
            Some(Pickled::Tuple(size)),
            Some(Pickled::Tuple(stride)),
        ) = (
            a.first(),
            a.get(1).and_then(Pickled::as_int),
            a.get(2),
            a.get(3),
        )
        else {
            return terr(format!("{what}: bad tensor arguments"));
        };
        let Pickled::Tuple(p) = pid.as_ref() else {
            return terr(format!("{what}: bad storage reference"));
        };
        let (Some(Pickled::Global(_, ty)), Some(Pickled::Str(key))) = (p.get(1), p.get(2)) else {
            return terr(format!("{what}: bad storage reference"));
        };
        let (width, decode): (usize, fn(&[u8]) -> f64) = match ty.as_str() {
            "IntStorage" => (4, |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
            "LongStorage" => (8, |b| {
                i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64
            }),
            "FloatStorage" => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
            "DoubleStorage" => (8, |b| {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }),
            other => return terr(format!("{what}: storage type {other} is not supported")),
        };
        let raw = self
            .storages
            .get(key)
            .ok_or_else(|| EplbError::Load(format!("torch.save file: storage {key} missing")))?;
        let dims = |t: &[Pickled]| -> Result<Vec<usize>> {
            t.iter()
                .map(|x| match x.as_int() {
                    Some(i) if i >= 0 => Ok(i as usize),
                    _ => terr(format!("{what}: bad size or stride")),
                })
                .collect()
        };
        let shape = dims(size)?;
        let strides = dims(stride)?;
        if shape.len() != strides.len() || offset < 0 {
            return terr(format!("{what}: bad size or stride"));
        }
        let elems = raw.len() / width;
        // Only tensors no larger than their storage (SGLang's are contiguous): this also keeps
        // a corrupt size from asking for an absurd allocation.
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= elems)
            .ok_or_else(|| {
                EplbError::Load(format!(
                    "torch.save file: {what} has size {shape:?}, larger than its storage of {elems} elements"
                ))
            })?;
        let mut data = Vec::with_capacity(n);
        let mut idx = vec![0usize; shape.len()];
        for _ in 0..n {
            let at = idx
                .iter()
                .zip(&strides)
                .try_fold(offset as usize, |acc, (i, s)| {
                    i.checked_mul(*s).and_then(|x| acc.checked_add(x))
                })
                .filter(|&at| at < elems)
                .ok_or_else(|| {
                    EplbError::Load(format!(
                        "torch.save file: {what}: an element lies beyond its storage of {elems}"
                    ))
                })?;
            data.push(decode(&raw[at * width..at * width + width]));
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(Tensor { shape, data })
    }
}

#[derive(Default)]
struct Machine {
    stack: Vec<Item>,
    memo: HashMap<u32, Pickled>,
}

enum Item {
    Mark,
    V(Pickled),
}

struct Bytes<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.at + n > self.b.len() {
            return terr("pickle ends early".into());
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.b[self.at..];
        let Some(end) = rest.iter().position(|&c| c == b'\n') else {
            return terr("pickle ends inside a name".into());
        };
        self.at += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
}

impl Machine {
    fn pop(&mut self) -> Result<Pickled> {
        match self.stack.pop() {
            Some(Item::V(v)) => Ok(v),
            _ => terr("pickle stack underflow".into()),
        }
    }
    /// Pops everything above the topmost mark, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Pickled>> {
        let mut items = Vec::new();
        loop {
            match self.stack.pop() {
                Some(Item::V(v)) => items.push(v),
                Some(Item::Mark) => break,
                None => return terr("pickle has no mark".into()),
            }
        }
        items.reverse();
        Ok(items)
    }
    fn top(&mut self) -> Result<&mut Pickled> {
        match self.stack.last_mut() {
            Some(Item::V(v)) => Ok(v),
            _ => terr("pickle stack underflow".into()),
        }
    }
    fn push(&mut self, v: Pickled) {
        self.stack.push(Item::V(v));
    }
    fn str(bytes: &[u8]) -> Result<Pickled> {
        String::from_utf8(bytes.to_vec())
            .map(Pickled::Str)
            .or_else(|_| terr("a pickled string is not UTF-8".into()))
    }

    fn run(mut self, pickle: &[u8]) -> Result<Pickled> {
        let mut b = Bytes { b: pickle, at: 0 };
        loop {
            let op = b.u8()?;
            match op {
                0x80 => {
                    b.u8()?; // PROTO
                }
                0x95 => {
                    b.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Item::Mark),
                b'}' => self.push(Pickled::Dict(Vec::new())),
                b']' => self.push(Pickled::List(Vec::new())),
                b')' => self.push(Pickled::Tuple(Vec::new())),
                b'N' => self.push(Pickled::None),
                0x88 => self.push(Pickled::Bool(true)),
                0x89 => self.push(Pickled::Bool(false)),
                b'K' => {
                    let v = b.u8()?;
                    self.push(Pickled::Int(v.into()))
                }
                b'M' => {
                    let s = b.take(2)?;
                    self.push(Pickled::Int(u16::from_le_bytes([s[0], s[1]]).into()))
                }
                b'J' => {
                    let s = b.take(4)?;
                    self.push(Pickled::Int(
                        i32::from_le_bytes([s[0], s[1], s[2], s[3]]).into(),
                    ))
                }
                0x8a => {
                    let n = b.u8()? as usize;
                    let s = b.take(n)?;
                    if n > 8 {
                        return terr("integer too large".into());
                    }
                    let mut buf = if s.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(s);
                    self.push(Pickled::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    let s = b.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(s);
                    self.push(Pickled::Float(f64::from_be_bytes(a)))
                }
                b'X' => {
                    let n = b.u32()? as usize;
                    let v = Self::str(b.take(n)?)?;
                    self.push(v)
                }
                0x8c => {
                    let n = b.u8()? as usize;
                    let v = Self::str(b.take(n)?)?;
                    self.push(v)
                }
                b'c' => {
                    let module = b.line()?;
                    let name = b.line()?;
                    self.push(Pickled::Global(module, name))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Pickled::Str(m), Pickled::Str(n)) => self.push(Pickled::Global(m, n)),
                        _ => return terr("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'q' => {
                    let i = b.u8()?.into();
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = b.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { b.u8()?.into() } else { b.u32()? };
                    let v = self.memo.get(&i).cloned().ok_or_else(|| {
                        EplbError::Load(format!("torch.save file: memo {i} unset"))
                    })?;
                    self.push(v)
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Pickled::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>>>()?;
                    items.reverse();
                    self.push(Pickled::Tuple(items))
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(Pickled::PersistentId(Box::new(pid)))
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    self.push(Pickled::Call(Box::new(f), Box::new(args)))
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.pop()?;
                    self.push(Pickled::Build(Box::new(obj), Box::new(state)))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Pickled::List(l) => l.push(v),
                        _ => return terr("APPEND to a non-list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Pickled::List(l) => l.extend(items),
                        _ => return terr("APPENDS to a non-list".into()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Pickled::Dict(d) => d.push((k, v)),
                        _ => return terr("SETITEM on a non-dict".into()),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return terr("SETITEMS with an odd item count".into());
                    }
                    let mut it = items.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    match self.top()? {
                        Pickled::Dict(d) => d.extend(pairs),
                        _ => return terr("SETITEMS on a non-dict".into()),
                    }
                }
                other => {
                    return terr(format!(
                        "pickle opcode 0x{other:02x} at byte {} is not supported by this reader",
                        b.at - 1
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_a_small_pickle() {
        // pickle.dumps({"a": 1, "b": (2.5, None, True), "c": [300, -5]}, protocol=2)
        let p: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02G@\x04\x00\x00\x00\x00\x00\x00N\x88\x87q\x03X\x01\x00\x00\x00cq\x04]q\x05(M,\x01J\xfb\xff\xff\xffeu.";
        let v = Machine::default().run(p).unwrap();
        assert_eq!(v.get("a"), Some(&Pickled::Int(1)));
        assert_eq!(
            v.get("b"),
            Some(&Pickled::Tuple(vec![
                Pickled::Float(2.5),
                Pickled::None,
                Pickled::Bool(true)
            ]))
        );
        assert_eq!(
            v.get("c"),
            Some(&Pickled::List(vec![Pickled::Int(300), Pickled::Int(-5)]))
        );
        assert!(Machine::default().run(b"\x80\x02}q\x00").is_err());
        assert!(Machine::default().run(b"\x80\x02\xff.").is_err());
    }

    #[test]
    fn not_a_zip() {
        assert!(TorchFile::parse(b"{\"logical_count\": []}").is_err());
        // A dump cut short (an interrupted copy) says so, not only "not a zip archive".
        let e = TorchFile::parse(&DUMP[..DUMP.len() / 2])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    const DUMP: &[u8] = include_bytes!("../../tests/data/sglang/expert_distribution_partial.pt");

    fn entry(name_end: &str) -> Vec<u8> {
        let mut zip = zip::ZipArchive::new(Cursor::new(DUMP)).unwrap();
        let name = zip
            .file_names()
            .map(|n| n.unwrap().into_owned())
            .find(|n| n.ends_with(name_end))
            .unwrap();
        let mut buf = Vec::new();
        zip.by_name(&name).unwrap().read_to_end(&mut buf).unwrap();
        buf
    }

    #[test]
    fn reads_the_real_dump() {
        let f = TorchFile::parse(DUMP).unwrap();
        assert_eq!(f.root.get("rank"), Some(&Pickled::Int(0)));
        assert_eq!(
            f.root.get("average_utilization_rate_over_window"),
            Some(&Pickled::None)
        );
        let t = f
            .tensor(f.root.get("logical_count").unwrap(), "lc")
            .unwrap();
        assert_eq!(t.shape, vec![6, 4, 8]);
        // Row-major int32 storage, read independently of the tensor code.
        let raw = entry("/data/0");
        let first = i32::from_le_bytes([raw[32], raw[33], raw[34], raw[35]]) as f64;
        assert_eq!(t.data[8], first); // pass 0, layer 1, expert 0
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Damaged pickles (the real dump's, with bytes changed or cut) give errors, never
        /// panics or huge allocations, in the machine and in tensor materialisation.
        #[test]
        fn damaged_pickles_error(
            edits in proptest::collection::vec((0usize..238, proptest::prelude::any::<u8>()), 1..6),
            cut in 0usize..238,
        ) {
            let pkl = entry("data.pkl");
            let storages: HashMap<String, Vec<u8>> = [("0".to_string(), entry("/data/0"))].into();
            let mut b = pkl.clone();
            for (at, x) in edits {
                if at < b.len() {
                    b[at] = x;
                }
            }
            for bytes in [&b[..], &pkl[..cut.min(pkl.len())]] {
                if let Ok(root) = Machine::default().run(bytes) {
                    let f = TorchFile { root, storages: storages.clone() };
                    if let Some(lc) = f.root.get("logical_count") {
                        let _ = f.tensor(lc, "lc");
                    }
                }
            }
        }
    }
}
