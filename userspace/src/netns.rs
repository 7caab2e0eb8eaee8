//! Network namespaces are per thread (`setns`): work that must happen inside another netns runs
//! on a thread of its own, so the agent's threads never change namespace. Sockets and netlink
//! connections opened there stay bound to that netns and may be used from anywhere afterwards.
use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// Runs `f` on a scoped thread that has joined the network namespace at `path`.
pub fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = File::open(path).map_err(|source| Error::Netns {
        path: path.into(),
        source,
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on an fd we own; affects only this (scoped, short-lived) thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(Error::Netns {
                        path: path.into(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::Netns {
                    path: path.into(),
                    source: std::io::Error::other("worker thread panicked"),
                })
            })
    })
}

/// The inode of a netns file: identifies a namespace whatever path it was reached by.
pub fn inode(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| Error::Netns {
            path: PathBuf::from(path),
            source,
        })
}

/// `/proc/<pid>/ns/net` of every process.
fn process_netns_paths() -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path().join("ns/net"))
}

/// One `/proc/<pid>/ns/net` per distinct namespace, this thread's own namespace left out.
fn process_namespaces() -> Vec<(PathBuf, u64)> {
    let own = inode(Path::new("/proc/thread-self/ns/net")).ok();
    let mut seen = std::collections::HashSet::new();
    process_netns_paths()
        .filter_map(|p| inode(&p).ok().map(|i| (p, i)))
        .filter(|(_, i)| Some(*i) != own && seen.insert(*i))
        .collect()
}

/// The last namespace found by [`holding`], by address: checked (same inode, address still
/// there) before a new scan.
static FOUND: std::sync::Mutex<Option<(std::net::IpAddr, PathBuf, u64)>> =
    std::sync::Mutex::new(None);

/// Whether an interface of the netns at `path` holds `ip`.
pub fn has_address(path: &Path, ip: std::net::IpAddr) -> bool {
    run_in(path, || {
        crate::nl::Netlink::new()
            .and_then(|nl| nl.addresses())
            .is_ok_and(|addrs| addrs.iter().any(|(_, a)| *a == ip))
    })
    .unwrap_or(false)
}

/// The network namespace (as `/proc/<pid>/ns/net`) in which an interface holds `ip`: how the
/// agent finds ztunnel's netns, and a pod's when the source names none, on a node where pod
/// namespaces have no names. Needs hostPID. An address two namespaces hold when it is looked
/// for (a pod being replaced, or one pretending) is nobody's: taking either could redirect, or
/// hand ztunnel, the wrong pod. Once found, a namespace keeps the address while it holds it.
pub fn holding(ip: std::net::IpAddr) -> Option<PathBuf> {
    let mut found = FOUND.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((cached_ip, path, ino)) = found.as_ref()
        && *cached_ip == ip
        && inode(path).ok() == Some(*ino)
        && has_address(path, ip)
    {
        return Some(path.clone());
    }
    *found = None;
    let holders: Vec<(PathBuf, u64)> = process_namespaces()
        .into_iter()
        .filter(|(path, _)| has_address(path, ip))
        .collect();
    match holders.as_slice() {
        [(path, ino)] => {
            *found = Some((ip, path.clone(), *ino));
            Some(path.clone())
        }
        [] => None,
        many => {
            let inodes: Vec<u64> = many.iter().map(|(_, i)| *i).collect();
            log::warn!(
                "{ip} is held by {} network namespaces {inodes:?}: none is taken",
                many.len()
            );
            None
        }
    }
}

/// Every namespace that holds each of `ips`, in one pass over the node's namespaces (one
/// address dump each): what the in-pod dataplane looks up for all the pods of an apply that
/// it must find by address, instead of one pass per pod.
pub fn holders_of(
    ips: &std::collections::BTreeSet<std::net::IpAddr>,
) -> std::collections::BTreeMap<std::net::IpAddr, Vec<PathBuf>> {
    let mut found: std::collections::BTreeMap<std::net::IpAddr, Vec<PathBuf>> = Default::default();
    if ips.is_empty() {
        return found;
    }
    for (path, _) in process_namespaces() {
        let held = run_in(&path, || {
            crate::nl::Netlink::new()
                .and_then(|nl| nl.addresses())
                .unwrap_or_default()
        })
        .unwrap_or_default();
        for (_, ip) in held {
            if ips.contains(&ip) {
                found.entry(ip).or_default().push(path.clone());
            }
        }
    }
    found
}

/// A path to the network namespace with this inode, if any process or `/run/netns` name still
/// holds it: how `cleanup` finds ztunnel's netns from a pin name alone.
pub fn find_by_inode(ino: u64) -> Option<PathBuf> {
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    named
        .chain(process_netns_paths())
        .find(|p| inode(p).ok() == Some(ino))
}
