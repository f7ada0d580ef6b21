//! The real node's network: a network namespace per node, joined to the host by a veth pair,
//! with the pod bridge (created by the CNI `bridge` plugin) inside it. Nothing is routed
//! anywhere else: the namespace has no default route, the host only gets a route to the pod
//! subnet through the veth, and no address is masqueraded.
//!
//! Slot `k` (1..=250, one per running node on the machine, claimed with a lock file):
//!
//! | what                         | address            |
//! |------------------------------|--------------------|
//! | host end of the veth         | `10.231.k.1/30`    |
//! | node end (node IP, CoreDNS)  | `10.231.k.2/30`    |
//! | pod subnet (bridge gateway)  | `10.232.k.0/24` (`.1`) |
//! | services (kube-proxy, in ns) | `10.0.0.0/24`      |
//!
//! The API server stays on 127.0.0.1; a forwarder in the test process listens on the host end
//! of the veth (same port) so the node's components and pods reach it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const LOCK_DIR: &str = "/run/moe-e2e";
const SLOTS: std::ops::RangeInclusive<u8> = 1..=250;

/// A node's network namespace and addresses; removed on drop.
#[derive(Debug)]
pub struct NodeNet {
    pub slot: u8,
    pub netns: String,
    host_if: String,
    netns_file: File,
    _lock: File,
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

pub fn run(prog: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn try_lock(f: &File) -> bool {
    // SAFETY: flock(2) on an open file descriptor we own; no memory is touched.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

impl NodeNet {
    /// Claims a free slot and creates the namespace, the veth pair and the host route.
    pub fn create() -> Result<NodeNet> {
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        for slot in SLOTS {
            let path = Path::new(LOCK_DIR).join(format!("node-{slot}.lock"));
            let lock =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            if !try_lock(&lock) {
                continue;
            }
            // The slot is ours; whatever a killed run left behind in it goes first.
            remove_leftovers(slot);
            return Self::setup(slot, lock);
        }
        bail!("no free node network slot in {LOCK_DIR} (250 nodes running?)")
    }

    fn setup(slot: u8, lock: File) -> Result<NodeNet> {
        let netns = format!("moe-e2e-{slot}");
        let host_if = format!("moe{slot}h");
        let node_if = format!("moe{slot}n");
        ip(&["netns", "add", &netns])?;
        let netns_file = File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("opening /run/netns/{netns}"))?;
        let net = NodeNet {
            slot,
            netns: netns.clone(),
            host_if: host_if.clone(),
            netns_file,
            _lock: lock,
        };
        let host_addr = format!("{}/30", net.host_ip());
        let node_addr = format!("{}/30", net.node_ip());
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &node_if, "netns", &netns,
        ])?;
        ip(&["addr", "add", &host_addr, "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&["-n", &netns, "addr", "add", &node_addr, "dev", &node_if])?;
        ip(&["-n", &netns, "link", "set", &node_if, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        // Pods reach the node IP and the API server forwarder through the bridge: forward
        // inside the namespace only (the host's own setting is untouched).
        run(
            "ip",
            &[
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        // The test process reaches pod IPs through the veth.
        ip(&[
            "route",
            "add",
            &net.pod_cidr(),
            "via",
            &net.node_ip(),
            "dev",
            &host_if,
        ])?;
        Ok(net)
    }

    /// Host end of the veth: where the node reaches the API server (through the forwarder).
    pub fn host_ip(&self) -> String {
        format!("10.231.{}.1", self.slot)
    }

    /// The node's InternalIP (kubelet, kube-proxy, CoreDNS listen here).
    pub fn node_ip(&self) -> String {
        format!("10.231.{}.2", self.slot)
    }

    pub fn pod_cidr(&self) -> String {
        format!("10.232.{}.0/24", self.slot)
    }

    /// Makes `cmd` run inside the node's network namespace (and only that namespace: mounts
    /// stay shared with the host, so kubelet's volume mounts are visible to containerd).
    pub fn enter(&self, cmd: &mut Command) -> Result<()> {
        let fd = self.netns_file.try_clone()?;
        // SAFETY: setns(2) on a descriptor opened before fork; the closure touches no memory
        // of the parent and only makes async-signal-safe calls.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    pub fn cgroup_root(&self) -> String {
        format!("/moe-e2e-{}", self.slot)
    }
}

impl Drop for NodeNet {
    fn drop(&mut self) {
        // Deleting the namespace removes the bridge, the node end of the veth and with it the
        // host end and the host route.
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// Removes a namespace, veth and cgroups a killed run left in `slot`.
fn remove_leftovers(slot: u8) {
    let netns = format!("moe-e2e-{slot}");
    if Path::new("/run/netns").join(&netns).exists() {
        tracing::warn!(
            netns,
            "removing a network namespace a previous run left behind"
        );
        let _ = ip(&["netns", "del", &netns]);
    }
    let _ = Command::new("ip")
        .args(["link", "del", &format!("moe{slot}h")])
        .output();
    crate::node::cgroups::remove(&format!("/moe-e2e-{slot}"));
}

/// The containerd CRI's CNI configuration: a bridge with host-local addresses from the pod
/// subnet (allocations kept in `state`), and the loopback interface.
pub fn cni_conflist(pod_cidr: &str, state: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "moe-e2e",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "isDefaultGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "dataDir": state.display().to_string(),
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
    .to_string()
}

/// Directory of the CNI plugin binaries (Debian's containernetworking-plugins).
pub fn cni_bin_dir() -> Option<PathBuf> {
    ["/usr/lib/cni", "/opt/cni/bin"]
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("bridge").exists() && d.join("host-local").exists())
}

#[cfg(test)]
mod tests {
    #[test]
    fn pods_get_a_default_route_through_the_bridge_and_no_masquerade() {
        let c: serde_json::Value =
            serde_json::from_str(&super::cni_conflist("10.232.7.0/24", "/x/ipam".as_ref()))
                .unwrap();
        let bridge = &c["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["isDefaultGateway"], true);
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.232.7.0/24");
        assert_eq!(bridge["ipam"]["dataDir"], "/x/ipam");
    }
}
