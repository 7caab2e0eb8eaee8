//! The agent's errors: each names the thing that is wrong (which pod, interface, map, file).
use std::{io, net::IpAddr, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node description {path}: {reason}")]
    NodeFile { path: PathBuf, reason: String },

    #[error("network namespace {path}: {source}")]
    Netns { path: PathBuf, source: io::Error },

    #[error("netlink {what}: {reason}")]
    Netlink { what: String, reason: String },

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

    #[error("eBPF program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },

    #[error("attaching {program} to {interface} ({direction}): {reason}")]
    Attach {
        program: &'static str,
        interface: String,
        direction: &'static str,
        reason: String,
    },

    #[error("eBPF map {map}: {reason}")]
    Map { map: &'static str, reason: String },

    #[error("bpffs {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },

    #[error("`{command}` failed: {reason}")]
    Command { command: String, reason: String },

    #[error("sysctl {path}: {reason}")]
    Sysctl { path: String, reason: String },

    #[error("state file {path}: {reason}")]
    StateFile { path: PathBuf, reason: String },

    #[error("node {node}: {reason}")]
    NodeFacts { node: String, reason: String },

    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
