//! Helpers shared by the `moectl` end-to-end tests: a temporary directory, running the binary,
//! and the one-line-error check every bad input must pass.
#![allow(dead_code)] // each test file uses a different subset

use std::path::PathBuf;
use std::process::{Command, Output};

/// A temporary directory removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!(
            "moectl-{}-{}-{name}",
            env!("CARGO_CRATE_NAME"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Dir(p)
    }
    pub fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    }
    pub fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn moectl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moectl"))
        .args(args)
        .output()
        .expect("run moectl")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a one-line error with exit code 2 that mentions `needle`, and nothing on stdout.
/// The error line is the last; only the `note: ` lines gathered before the failure may precede
/// it.
pub fn assert_bad(o: &Output, needle: &str) {
    let all = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {all}");
    let lines: Vec<&str> = all.trim_end().lines().collect();
    let (last, before) = lines.split_last().expect("no error line");
    assert!(
        last.starts_with("error: "),
        "the last line is not the error: {all}"
    );
    assert!(
        before.iter().all(|l| l.starts_with("note: ")),
        "not one error line after the notes: {all}"
    );
    let err = last;
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "expected '{needle}' in: {all}"
    );
    assert!(o.stdout.is_empty(), "stdout should be empty: {}", stdout(o));
}

/// Asserts clap's usage error: exit code 2, nothing on stdout, and its whole message on stderr
/// (the `error:` line, the details that name `needle`, the usage line or the pointer to --help).
pub fn assert_usage(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
    assert!(
        err.contains("Usage: moectl") || err.contains("try '--help'"),
        "not clap's whole message: {err}"
    );
    assert!(o.stdout.is_empty(), "stdout should be empty: {}", stdout(o));
}
