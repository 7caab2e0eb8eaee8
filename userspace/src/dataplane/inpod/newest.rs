//! In-pod eBPF, ztunnel rollouts: each pod's new connections go to the newest ztunnel that
//! acked it (`ebpf/src/inpod/newest.rs`).
//!
//! A ztunnel that acks pods over ZDS has opened its listeners in their netns. For each pod,
//! its listeners are found by what only ztunnel's can show together: ztunnel's ports, its
//! mark, and an inode the acking process holds in its fd table (sock_diag and `/proc/<pid>/fd`).
//! They are taken from it (`pidfd_getfd`), put in `ZTUNNEL_NEWEST` under the pod's addresses
//! and ports, and the program is attached to each group. A ztunnel that started
//! before the one a pod's connections go to is not given them back by a late ack (a ZDS
//! reconnect): processes are told apart by their start time.
//!
//! Done in the ZDS session's thread before the session goes on: for a snapshot, before
//! `snapshot_sent`, so a new ztunnel is not ready (and its predecessor not told to go) before
//! the pods' new connections are its own. Inbound ports are switched for every pod before
//! outbound ones: the new ztunnel's first HBONE connections then reach its own inbound
//! listeners, never the old one's draining server.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use aya::maps::{MapData, SockHash};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use zdivert_common::{
    ListenerKey, PORT_INBOUND_HBONE, PORT_INBOUND_PLAIN, PORT_OUTBOUND, map::ZTUNNEL_NEWEST,
    program,
};

use crate::{
    dataplane::ebpf::maps,
    error::{Error, Result},
    netns,
    zds::InPodWorkload,
    ztunnel::{ZtunnelListener, ztunnel_listeners},
};

pub struct Newest {
    program: OwnedFd,
    listeners: SockHash<MapData, ListenerKey>,
    /// Each pod netns's ztunnel and the keys that point at its listeners, by inode.
    pods: BTreeMap<u64, Steered>,
    handovers: Family<Vec<(&'static str, &'static str)>, Counter>,
}

struct Steered {
    to: Process,
    keys: Vec<ListenerKey>,
}

impl Newest {
    /// Takes the program and map out of the loaded object. What an earlier agent recorded stays:
    /// each entry is a listener of ztunnel's, until it closes or an ack replaces it.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Newest> {
        let name = program::ZTUNNEL_NEWEST;
        let prog: &aya::programs::SkReuseport = ebpf
            .program(name)
            .ok_or(Error::ProgramMissing { program: name })?
            .try_into()
            .map_err(|source| Error::Program {
                program: name,
                source,
            })?;
        let fd = prog.fd().map_err(|source| Error::Program {
            program: name,
            source,
        })?;
        let program = fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::Program {
                program: name,
                source: aya::programs::ProgramError::IOError(e),
            })?;
        Ok(Newest {
            program,
            listeners: maps::take(ebpf, ZTUNNEL_NEWEST)?,
            pods: BTreeMap::new(),
            handovers: Family::default(),
        })
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ztunnel_handovers",
            "Pods whose new connections were given to the ztunnel that acked them (outcome \
             handed_over), or could not be (failed: the kernel's own choice between ztunnels \
             stands for that pod)",
            self.handovers.clone(),
        );
    }

    /// ztunnel `pid` acked `pods`: those for which it is the newest ztunnel get their new
    /// connections sent to its listeners from now on.
    pub fn acked(&mut self, pid: i32, pods: &[InPodWorkload]) {
        let zt = match Process::of(pid) {
            Ok(p) => p,
            Err(source) => {
                let e = Error::ZtunnelProcess {
                    pid,
                    what: "its start time".into(),
                    source,
                };
                for w in pods {
                    self.failed(&w.info.name, &e);
                }
                return;
            }
        };
        let mut fds = FdTable::new(pid);
        let mut plans = Vec::new();
        for w in pods {
            let Ok(inode) = netns::inode(&w.netns) else {
                continue;
            };
            if let Some(cur) = self.pods.get(&inode).map(|s| s.to)
                && cur != zt
                && cur.started > zt.started
                && cur.alive()
            {
                continue;
            }
            match fds.listeners_in(&w.netns) {
                Ok(found) if !found.is_empty() => plans.push((inode, w, found)),
                Ok(_) => self.failed(
                    &w.info.name,
                    &Error::ZtunnelProcess {
                        pid,
                        what: "none of its listeners is in the pod".into(),
                        source: std::io::ErrorKind::NotFound.into(),
                    },
                ),
                Err(e) => self.failed(&w.info.name, &e),
            }
        }
        // Inbound ports first, for every pod: see the module's comment.
        let mut steered: BTreeMap<u64, Result<Vec<ListenerKey>>> = BTreeMap::new();
        for ports in [
            &[PORT_INBOUND_HBONE, PORT_INBOUND_PLAIN][..],
            &[PORT_OUTBOUND][..],
        ] {
            for (inode, w, found) in &plans {
                let so_far = steered.entry(*inode).or_insert_with(|| Ok(Vec::new()));
                if let Ok(keys) = so_far {
                    match self.point(pid, &w.ips, found, ports) {
                        Ok(k) => keys.extend(k),
                        Err(e) => *so_far = Err(e),
                    }
                }
            }
        }
        for (inode, w, _) in &plans {
            match steered.remove(inode) {
                Some(Ok(keys)) => {
                    self.handovers
                        .get_or_create(&vec![("outcome", "handed_over")])
                        .inc();
                    log::debug!("pod {}: new connections to ztunnel pid {pid}", w.info.name);
                    self.pods.insert(*inode, Steered { to: zt, keys });
                }
                Some(Err(e)) => self.failed(&w.info.name, &e),
                None => {}
            }
        }
    }

    /// Points `ips` on `ports` at the listeners `found`, and attaches the program to their
    /// groups. Returns the keys written.
    fn point(
        &mut self,
        pid: i32,
        ips: &[IpAddr],
        found: &[(ZtunnelListener, OwnedFd)],
        ports: &[u16],
    ) -> Result<Vec<ListenerKey>> {
        let mut keys = Vec::new();
        for &port in ports {
            let of = |v6: bool| found.iter().find(|(l, _)| l.port == port && l.v6 == v6);
            for ip in ips {
                // An IPv4 address is served by an IPv4 listener, else by the IPv6 wildcard one.
                let listener = match ip {
                    IpAddr::V4(_) => of(false).or_else(|| of(true)),
                    IpAddr::V6(_) => of(true),
                };
                let Some((_, fd)) = listener else { continue };
                let key = ListenerKey {
                    addr: maps::key(*ip),
                    port,
                    _reserved: 0,
                };
                self.listeners
                    .insert(key, fd.as_raw_fd(), 0)
                    .map_err(map_err(ZTUNNEL_NEWEST))?;
                keys.push(key);
            }
            for (_, fd) in found.iter().filter(|(l, _)| l.port == port) {
                attach(&self.program, fd).map_err(|source| Error::ZtunnelProcess {
                    pid,
                    what: format!(
                        "attaching {} to its :{port} listener",
                        program::ZTUNNEL_NEWEST
                    ),
                    source,
                })?;
            }
        }
        Ok(keys)
    }

    /// Forgets the pod netns not in `keep` (released, or gone) and their keys. A key another
    /// pod's addresses hold now stays.
    pub fn keep_only(&mut self, keep: &BTreeSet<u64>) {
        let (kept, gone): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.pods)
            .into_iter()
            .partition(|(inode, _)| keep.contains(inode));
        self.pods = kept;
        let held: BTreeSet<&ListenerKey> = self.pods.values().flat_map(|s| &s.keys).collect();
        for key in gone.values().flat_map(|s| &s.keys) {
            if !held.contains(key) {
                let _ = self.listeners.remove(key);
            }
        }
    }

    fn failed(&self, pod: &str, e: &Error) {
        log::warn!(
            "pod {pod}: its new connections stay with the kernel's choice between ztunnels: {}",
            e.chain()
        );
        self.handovers
            .get_or_create(&vec![("outcome", "failed")])
            .inc();
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { map, source }
}

/// `SO_ATTACH_REUSEPORT_EBPF`: the program now chooses for the socket's whole group.
fn attach(program: &OwnedFd, socket: &OwnedFd) -> std::io::Result<()> {
    let fd = program.as_raw_fd();
    // SAFETY: setsockopt(2) reading an int from our stack.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_EBPF,
            (&fd as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A process, told apart from a later one given the same pid by its start time (clock ticks
/// after boot, `/proc/<pid>/stat`'s 22nd field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Process {
    pid: i32,
    started: u64,
}

impl Process {
    fn of(pid: i32) -> std::io::Result<Process> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The command name (field 2) may hold spaces and parentheses: count after its end.
        let started = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(19))
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("/proc/{pid}/stat: no start time")))?;
        Ok(Process { pid, started })
    }

    fn alive(&self) -> bool {
        Process::of(self.pid).is_ok_and(|p| p == *self)
    }
}

/// One ztunnel process's sockets by inode, read from `/proc/<pid>/fd` once per ack (not once
/// per pod, nor per listener of the other ztunnel).
struct FdTable {
    pid: i32,
    by_inode: Option<BTreeMap<u32, i32>>,
    pidfd: Option<OwnedFd>,
}

impl FdTable {
    fn new(pid: i32) -> FdTable {
        FdTable {
            pid,
            by_inode: None,
            pidfd: None,
        }
    }

    /// ztunnel's listeners in the netns at `ns` that this process holds, each as our own fd.
    fn listeners_in(&mut self, ns: &std::path::Path) -> Result<Vec<(ZtunnelListener, OwnedFd)>> {
        let mut found = Vec::new();
        for l in ztunnel_listeners(ns)? {
            // Not in the table: another ztunnel's listener (the table was read after this
            // process acked, so every listener it opened for these pods is there).
            if let Some(fd) = self.fd_of(l.inode)? {
                found.push((l, self.take(fd)?));
            }
        }
        Ok(found)
    }

    fn fd_of(&mut self, inode: u32) -> Result<Option<i32>> {
        if self.by_inode.is_none() {
            self.by_inode = Some(
                self.read()
                    .map_err(|source| self.error("its fds", source))?,
            );
        }
        Ok(self.by_inode.as_ref().and_then(|t| t.get(&inode)).copied())
    }

    fn read(&self) -> std::io::Result<BTreeMap<u32, i32>> {
        let mut table = BTreeMap::new();
        for entry in std::fs::read_dir(format!("/proc/{}/fd", self.pid))? {
            let entry = entry?;
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue; // closed meanwhile
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse().ok());
            let fd = entry.file_name().to_str().and_then(|f| f.parse().ok());
            if let (Some(inode), Some(fd)) = (inode, fd) {
                table.insert(inode, fd);
            }
        }
        Ok(table)
    }

    /// A copy of the process's fd `fd`: the same socket, now ours too.
    fn take(&mut self, fd: i32) -> Result<OwnedFd> {
        if self.pidfd.is_none() {
            // SAFETY: pidfd_open(2) with no flags; the fd is owned right away.
            let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
            if raw < 0 {
                return Err(self.error("pidfd_open", std::io::Error::last_os_error()));
            }
            // SAFETY: a fresh fd we own.
            self.pidfd = Some(unsafe { OwnedFd::from_raw_fd(raw as i32) });
        }
        let pidfd = self.pidfd.as_ref().map_or(-1, |p| p.as_raw_fd());
        // SAFETY: pidfd_getfd(2) with no flags; the fd is owned right away.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) };
        if raw < 0 {
            return Err(self.error("pidfd_getfd", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
    }

    fn error(&self, what: &str, source: std::io::Error) -> Error {
        Error::ZtunnelProcess {
            pid: self.pid,
            what: what.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_a_process_listener_by_its_inode() {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let fd = listener.as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let inode: u32 = (link.to_str().unwrap())
            .trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap();
        let mut table = FdTable::new(std::process::id() as i32);
        assert_eq!(table.fd_of(inode).unwrap(), Some(fd));
        let copy = std::net::TcpListener::from(table.take(fd).unwrap());
        assert_eq!(copy.local_addr().unwrap(), listener.local_addr().unwrap());
        assert_eq!(table.fd_of(u32::MAX).unwrap(), None);
    }

    #[test]
    fn tells_a_process_from_a_later_one_with_its_pid() {
        let me = Process::of(std::process::id() as i32).unwrap();
        assert!(me.started > 0 && me.alive());
        let earlier = Process {
            started: me.started - 1,
            ..me
        };
        assert!(!earlier.alive(), "same pid, another start time");
    }
}
