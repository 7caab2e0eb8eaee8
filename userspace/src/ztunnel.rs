//! Whether ztunnel is there to take what is captured: its listeners, asked of its netns. A
//! ztunnel pod whose process has not started listening yet, or has exited, keeps its netns (and
//! so its place in the maps); the dataplanes keep failing closed meanwhile, and this is how the
//! agent and `zdivert status` can say so by name.
use std::{collections::BTreeSet, os::fd::FromRawFd, path::Path};

use zdivert_common::{PORT_INBOUND_HBONE, PORT_INBOUND_PLAIN, PORT_OUTBOUND};

use crate::{
    error::{Error, Result},
    netns,
};

/// The listeners captured traffic is handed to.
pub const LISTENERS: [u16; 3] = [PORT_OUTBOUND, PORT_INBOUND_PLAIN, PORT_INBOUND_HBONE];

/// The TCP ports something listens on in the netns at `ns`.
pub fn listening(ns: &Path) -> Result<BTreeSet<u16>> {
    Ok(sockets_in(ns, 1 << TCP_LISTEN)?
        .into_iter()
        .map(|s| s.sport)
        .collect())
}

/// The listeners on ztunnel's ports in the netns at `ns` that are not ztunnel's: without its
/// mark (0x539), which a process in a pod cannot set without NET_ADMIN. In-pod, such a process
/// hopes to take what is captured for ztunnel (the programs refuse it; istio-cni's rules do
/// not). Marks are reported to a requester with CAP_NET_ADMIN only: without one, none is found.
pub fn foreign_listeners(ns: &Path) -> Result<BTreeSet<u16>> {
    use zdivert_common::{MARK_INPOD_ZTUNNEL, MARK_MASK};
    Ok(sockets_in(ns, 1 << TCP_LISTEN)?
        .into_iter()
        .filter(|s| LISTENERS.contains(&s.sport))
        .filter(|s| s.mark.is_some_and(|m| m & MARK_MASK != MARK_INPOD_ZTUNNEL))
        .map(|s| s.sport)
        .collect())
}

/// One of ztunnel's listeners in a pod's netns: on one of its ports, with its mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZtunnelListener {
    pub v6: bool,
    pub port: u16,
    /// The socket's inode, by which a process's fd table names it (`socket:[inode]`).
    pub inode: u32,
}

/// The listeners on ztunnel's ports with ztunnel's mark in the netns at `ns`: every ztunnel
/// serving the pod (two during a rollout) has its own.
pub fn ztunnel_listeners(ns: &Path) -> Result<Vec<ZtunnelListener>> {
    use zdivert_common::{MARK_INPOD_ZTUNNEL, MARK_MASK};
    Ok(sockets_in(ns, 1 << TCP_LISTEN)?
        .into_iter()
        .filter(|s| LISTENERS.contains(&s.sport) && s.inode != 0)
        .filter(|s| s.mark.is_some_and(|m| m & MARK_MASK == MARK_INPOD_ZTUNNEL))
        .map(|s| ZtunnelListener {
            v6: s.family == libc::AF_INET6 as u8,
            port: s.sport,
            inode: s.inode,
        })
        .collect())
}

/// Whether a process in the netns at `ns` still holds a TCP connection: a replaced ztunnel
/// drains until this is false. Sockets whose process is gone (orphans closing, TIME_WAIT) do
/// not count.
pub fn holds_connections(ns: &Path) -> Result<bool> {
    Ok(sockets_in(ns, CONNECTED)?.iter().any(|s| s.inode != 0))
}

/// ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING.
const CONNECTED: u32 =
    (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);

fn sockets_in(ns: &Path, states: u32) -> Result<Vec<Socket>> {
    netns::run_in(ns, || {
        let mut out = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            out.extend(
                sockets(family as u8, states).map_err(|source| Error::Netns {
                    path: ns.into(),
                    source,
                })?,
            );
        }
        Ok(out)
    })?
}

/// The listeners of `LISTENERS` that are missing from `ports`.
pub fn missing(ports: &BTreeSet<u16>) -> Vec<u16> {
    LISTENERS
        .into_iter()
        .filter(|p| !ports.contains(p))
        .collect()
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_LISTEN: u32 = 10;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then a 48-byte socket id.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`: family, state, timer, retrans, then the socket id (source port first),
/// expires, queues, uid, inode.
const MSG_SPORT_OFF: usize = 4;
const MSG_INODE_OFF: usize = 68;
const MSG_LEN: usize = 72;
/// The attribute carrying the socket's mark, sent to a requester with CAP_NET_ADMIN.
const INET_DIAG_MARK: u16 = 15;

struct Socket {
    family: u8,
    sport: u16,
    /// 0 for a socket no process holds.
    inode: u32,
    mark: Option<u32>,
}

/// This netns's TCP sockets of one family in `states` (a bit per TCP state), asked of
/// sock_diag: with LISTEN alone the kernel walks only its listening hash, where `/proc/net/tcp`
/// walks every connection of every netns on the machine (16 ms per apply once a node held a
/// few thousand TIME_WAIT sockets).
fn sockets(family: u8, states: u32) -> std::io::Result<Vec<Socket>> {
    // SAFETY: a plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let mut req = [0u8; NLMSG_HDRLEN + REQ_LEN];
    req[0..4].copy_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[NLMSG_HDRLEN] = family;
    req[NLMSG_HDRLEN + 1] = libc::IPPROTO_TCP as u8;
    req[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8].copy_from_slice(&states.to_ne_bytes());
    // SAFETY: sending our buffer on our socket (the kernel is the default destination).
    if unsafe { libc::send(raw, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: receiving into our buffer, at most its length.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let got = &buf[..n as usize];
        let mut at = 0;
        while let Some(header) = got.get(at..at + NLMSG_HDRLEN) {
            let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let kind = u16::from_ne_bytes([header[4], header[5]]);
            if kind == libc::NLMSG_DONE as u16 || len < NLMSG_HDRLEN {
                return Ok(found);
            }
            if kind == libc::NLMSG_ERROR as u16 {
                let code = got
                    .get(at + NLMSG_HDRLEN..at + NLMSG_HDRLEN + 4)
                    .map_or(0, |e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
                return Err(std::io::Error::from_raw_os_error(-code));
            }
            let msg = at + NLMSG_HDRLEN;
            let field = |off: usize, len: usize| got.get(msg + off..msg + off + len);
            if let (Some(p), Some(i)) = (field(MSG_SPORT_OFF, 2), field(MSG_INODE_OFF, 4)) {
                let attrs = got
                    .get(msg + MSG_LEN..at + len.min(got.len() - at))
                    .unwrap_or(&[]);
                found.push(Socket {
                    family,
                    sport: u16::from_be_bytes([p[0], p[1]]),
                    inode: u32::from_ne_bytes([i[0], i[1], i[2], i[3]]),
                    mark: mark_attr(attrs),
                });
            }
            at += (len + 3) & !3;
        }
    }
}

/// The mark among a message's attributes (`struct rtattr`: length, type, value; 4-aligned).
fn mark_attr(mut attrs: &[u8]) -> Option<u32> {
    while let Some(head) = attrs.get(..4) {
        let len = u16::from_ne_bytes([head[0], head[1]]) as usize;
        let kind = u16::from_ne_bytes([head[2], head[3]]);
        if len < 4 {
            return None;
        }
        if kind == INET_DIAG_MARK {
            let v = attrs.get(4..8)?;
            return Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]));
        }
        attrs = attrs.get((len + 3) & !3..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_listener_of_this_netns_and_what_is_missing() {
        let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let ports: BTreeSet<u16> = sockets(libc::AF_INET as u8, 1 << TCP_LISTEN)
            .unwrap()
            .into_iter()
            .map(|s| s.sport)
            .collect();
        assert!(ports.contains(&port), "{port} in {ports:?}");
        assert_eq!(missing(&BTreeSet::from([15001, 15008])), vec![15006]);
        // A connection of this process counts as held; its listener alone does not.
        let held = |s: &Socket| s.inode != 0 && (s.sport == port);
        let before = sockets(libc::AF_INET as u8, CONNECTED).unwrap();
        assert!(!before.iter().any(held));
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_a, _) = l.accept().unwrap();
        let after = sockets(libc::AF_INET as u8, CONNECTED).unwrap();
        assert!(after.iter().any(held), "the accepted connection is held");
    }

    #[test]
    fn reads_the_mark_among_the_attributes() {
        let attr = |kind: u16, value: &[u8]| {
            let mut a = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
            a.extend(kind.to_ne_bytes());
            a.extend(value);
            a.resize((a.len() + 3) & !3, 0);
            a
        };
        let mut attrs = attr(1, &[7, 0, 0]);
        attrs.extend(attr(INET_DIAG_MARK, &0x539u32.to_ne_bytes()));
        assert_eq!(mark_attr(&attrs), Some(0x539));
        assert_eq!(mark_attr(&attr(1, &[0; 8])), None);
        assert_eq!(
            mark_attr(&[0, 0, 15, 0]),
            None,
            "a zero length ends the walk"
        );
    }
}
