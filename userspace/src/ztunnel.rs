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
    netns::run_in(ns, || {
        let mut ports = BTreeSet::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            ports.extend(listeners(family as u8).map_err(|source| Error::Netns {
                path: ns.into(),
                source,
            })?);
        }
        Ok(ports)
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
/// `struct inet_diag_msg`: family, state, timer, retrans, then the socket id (source port first).
const MSG_SPORT_OFF: usize = 4;

/// The local ports of this netns's listening TCP sockets of one family, asked of sock_diag
/// with LISTEN alone as the state filter: the kernel then walks only its listening hash, where
/// `/proc/net/tcp` walks every connection of every netns on the machine (16 ms per apply once
/// a node held a few thousand TIME_WAIT sockets).
fn listeners(family: u8) -> std::io::Result<Vec<u16>> {
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
    req[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    // SAFETY: sending our buffer on our socket (the kernel is the default destination).
    if unsafe { libc::send(raw, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut ports = Vec::new();
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
                return Ok(ports);
            }
            if kind == libc::NLMSG_ERROR as u16 {
                let code = got
                    .get(at + NLMSG_HDRLEN..at + NLMSG_HDRLEN + 4)
                    .map_or(0, |e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
                return Err(std::io::Error::from_raw_os_error(-code));
            }
            let sport = at + NLMSG_HDRLEN + MSG_SPORT_OFF;
            if let Some(p) = got.get(sport..sport + 2) {
                ports.push(u16::from_be_bytes([p[0], p[1]]));
            }
            at += (len + 3) & !3;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_listener_of_this_netns_and_what_is_missing() {
        let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let ports: BTreeSet<u16> = listeners(libc::AF_INET as u8)
            .unwrap()
            .into_iter()
            .collect();
        assert!(ports.contains(&port), "{port} in {ports:?}");
        assert_eq!(missing(&BTreeSet::from([15001, 15008])), vec![15006]);
    }
}
