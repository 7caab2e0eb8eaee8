//! The agent's errors: each names the thing that is wrong (which pod, interface, map, file) and
//! keeps what the kernel or the library said as its source. `Display` says only this layer's
//! part; print a chain with `{:#}` through anyhow or with [`Chain`].
use std::{fmt, io, net::IpAddr, path::PathBuf};

/// Whatever a library reported while attaching or pinning a program (aya's program, link, tc
/// and pin errors), kept whole.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// How many of the verifier's last lines an error shows: enough to see the instruction it
/// stopped at and its reason, not the whole walk.
const VERIFIER_TAIL_LINES: usize = 12;

fn verifier_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(VERIFIER_TAIL_LINES)..].join("\n")
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node description {path}: cannot read it")]
    NodeFileRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("node description {path}")]
    NodeFile {
        path: PathBuf,
        #[source]
        source: crate::source::file::Invalid,
    },

    #[error("network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("netlink: {what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },

    /// A netlink socket the agent speaks to directly (nftables, the link watch, tc errnos).
    #[error("netlink: {what}")]
    NetlinkIo {
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("netlink: {what}: the message cannot be built")]
    RouteMessage {
        what: String,
        #[source]
        source: Cause,
    },

    #[error("netlink: {what}: not found")]
    NetlinkNotFound { what: String },

    #[error("pod {pod}: no route to its address {ip} on this node (is it scheduled here?)")]
    PodRoute { pod: String, ip: IpAddr },

    #[error("pod {pod}: its addresses route to different interfaces ({first} and {second})")]
    PodSplitRoute {
        pod: String,
        first: String,
        second: String,
    },

    #[error("pod {pod}: address {ip} routes to {interface}, which is not a veth to a pod")]
    PodNotVeth {
        pod: String,
        ip: IpAddr,
        interface: String,
    },

    #[error("ztunnel {pod}: no interface holds its address {ip} in {netns}")]
    ZtunnelAddress {
        pod: String,
        ip: IpAddr,
        netns: PathBuf,
    },

    #[error(
        "ztunnel {pod}: no network namespace on this node holds its address {ip} \
         (scanned /proc/*/ns/net; the agent needs hostPID)"
    )]
    ZtunnelNetnsNotFound { pod: String, ip: IpAddr },

    #[error(
        "the agent was built without the eBPF object: run `cargo xtask build-ebpf` and rebuild"
    )]
    NoEbpfObject,

    #[error("{mode} eBPF redirection cannot run on this kernel: {why}")]
    EbpfUnusable { mode: &'static str, why: String },

    #[error("eBPF program {program} is missing from the object")]
    ProgramMissing { program: &'static str },

    /// The kernel refused to load a program: its verifier's last lines say why.
    #[error(
        "the kernel refuses eBPF program {program} ({errno}); the verifier's last lines:\n{}",
        verifier_tail(log)
    )]
    Rejected {
        program: &'static str,
        errno: io::Error,
        /// The verifier's whole log (`zdivert probe --verifier-logs DIR` writes it out).
        log: String,
    },

    #[error("eBPF program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("attaching {program} to {interface} ({direction})")]
    Attach {
        program: &'static str,
        interface: String,
        direction: &'static str,
        #[source]
        source: Cause,
    },

    #[error("eBPF map {map} is missing from the object")]
    MapMissing { map: &'static str },

    #[error("eBPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("bpffs {path}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("bpffs {path}: cannot pin there")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },

    #[error("{path} is not a bpffs mount (mount -t bpf bpf {path})")]
    NotBpffs { path: PathBuf },

    #[error("`{command}` could not run")]
    CommandSpawn {
        command: String,
        #[source]
        source: io::Error,
    },

    #[error("`{command}` failed: {stderr}")]
    CommandFailed { command: String, stderr: String },

    #[error("sysctl {path}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },

    #[error("state file {path}")]
    StateFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("state file {path}: not the format this agent writes")]
    StateFileFormat {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error(
        "this node has no source address of the family of {towards} towards it: the layout needs one"
    )]
    NoSourceAddress { towards: IpAddr },

    #[error("node {node}: {reason}")]
    NodeFacts { node: String, reason: String },

    #[error(
        "pod {pod}: no network namespace on this node holds its addresses (scanned /proc/*/ns/net and /run/netns)"
    )]
    PodNetnsNotFound { pod: String },

    #[error(
        "pod {pod}: its netns {netns} is gone or no longer holds its address; its last redirection stays, and no other netns is taken for it"
    )]
    PodNetnsLost { pod: String, netns: PathBuf },

    #[error(
        "pod {pod}: the netns that holds its address is {owner}'s, as the runtime gave it: not taken"
    )]
    PodNetnsClaimed { pod: String, owner: String },

    #[error("pod {pod}: {holders} network namespaces hold its address: none is taken")]
    PodAddressAmbiguous { pod: String, holders: usize },

    #[error("pod {pod}: ztunnel did not acknowledge it: {why}")]
    NotAcked { pod: String, why: String },

    #[error("netns {netns}: no interface holds the pod's addresses {ips:?}")]
    PodInterfaceNotFound { netns: PathBuf, ips: Vec<IpAddr> },

    #[error("the pod's {interface} cannot be guarded on the node's side: {why}")]
    PodNotGuarded { interface: String, why: String },

    #[error("ZDS socket {path}")]
    Zds {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("ztunnel pid {pid}: {what}")]
    ZtunnelProcess {
        pid: i32,
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line (`a: b: c`), for log lines.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

impl Error {
    /// One line with the causes, for logs and status.
    pub fn chain(&self) -> Chain<'_> {
        Chain(self)
    }

    /// The errno the kernel answered, if that is what this error comes down to.
    pub fn errno(&self) -> Option<i32> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<io::Error>() {
                return io.raw_os_error();
            }
            if let Some(rtnetlink::Error::NetlinkError(m)) = c.downcast_ref::<rtnetlink::Error>() {
                return m.code.map(|c| -c.get());
            }
            cause = c.source();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_names_every_cause_once() {
        let e = Error::Bpffs {
            path: "/sys/fs/bpf/zdivert".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        let line = e.chain().to_string();
        assert!(line.starts_with("bpffs /sys/fs/bpf/zdivert: "), "{line}");
        assert!(line.contains("Operation not permitted"), "{line}");
        assert_eq!(line.matches("bpffs").count(), 1, "{line}");
        assert_eq!(e.errno(), Some(libc::EPERM));
    }

    /// What an operator reads when a kernel refuses a program: which one, the errno, and the
    /// verifier's reason at the end of its log, not the whole walk.
    #[test]
    fn a_refused_program_is_named_with_the_verifiers_last_lines() {
        let walk: Vec<String> = (0..200).map(|i| format!("{i}: (bf) r6 = r1")).collect();
        let log = format!(
            "{}\n623: (79) r2 = *(u64 *)(r10 -144)\ninvalid read from stack off -144+0 size 8\n\n",
            walk.join("\n")
        );
        let e = Error::Rejected {
            program: "zd_zt_return",
            errno: io::Error::from_raw_os_error(libc::EACCES),
            log,
        };
        let text = e.to_string();
        assert!(text.contains("eBPF program zd_zt_return"), "{text}");
        assert!(text.contains("Permission denied"), "{text}");
        assert!(
            text.ends_with("invalid read from stack off -144+0 size 8"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1 + VERIFIER_TAIL_LINES, "{text}");
        assert!(
            !text.contains("\n0: (bf)"),
            "the walk's start is left out:\n{text}"
        );
    }
}
