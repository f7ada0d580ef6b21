//! Links the `moectl` binary as a position-dependent executable on Linux.
//!
//! `moectl plan` is meant to cost little more than its planning (docs/eplb.md, "moectl plan end
//! to end"), and a process's start is part of that. As a position-independent executable the
//! dynamic loader relocates every pointer in its read-only data at each start: 26,000 of them
//! since `record --deployment` brought the Kubernetes client in, one copied page per 4 KB
//! (1.51 ms to print `--version`, against 1.29 ms before it). Linked at a fixed address they are
//! resolved once, by the linker (1.26 ms). What this gives up is the executable's own address
//! randomisation (its libraries, heap and stack are still randomised), as Go's default builds,
//! kubectl among them, do.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bin=moectl=-no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
