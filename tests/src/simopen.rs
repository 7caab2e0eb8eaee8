//! TCP simultaneous open: two sockets that each connect to the other's port, their SYNs
//! crossing, become one connection without a listener. Each side holds a TCP-MD5 key for the
//! other (RFC 2385), so a third party's listener, which has no key, drops their SYNs instead
//! of answering them: a socket captured towards ztunnel stays in SYN_SENT.
use std::{
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::ns::Netns;

/// `struct tcp_md5sig` of linux/tcp.h.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: i32,
    key: [u8; 80],
}

const KEY: &[u8] = b"zdivert simultaneous open";

/// A socket of `ns` bound to `local`, keyed for `peer`.
fn keyed_socket(ns: &Netns, local: SocketAddr, peer: SocketAddr) -> Result<Socket> {
    ns.exec(move || -> Result<Socket> {
        let s = Socket::new(
            Domain::for_address(local),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        s.bind(&local.into())
            .with_context(|| format!("binding {local}"))?;
        let peer_addr = socket2::SockAddr::from(peer);
        // SAFETY: all-zero is a valid tcp_md5sig; the address is copied within its storage.
        let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
        unsafe {
            std::ptr::copy_nonoverlapping(
                peer_addr.as_ptr() as *const u8,
                &mut sig.addr as *mut _ as *mut u8,
                peer_addr.len() as usize,
            )
        };
        sig.keylen = KEY.len() as u16;
        sig.key[..KEY.len()].copy_from_slice(KEY);
        // SAFETY: setsockopt with a pointer to a live struct of the size given.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_MD5SIG,
                &sig as *const _ as *const libc::c_void,
                std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("TCP_MD5SIG");
        }
        Ok(s)
    })
}

/// What became of each side's connect: `a` connects first and is left in SYN_SENT for a
/// moment (its SYN is dropped on the way or by a keyless listener), then `b` connects to it.
pub struct Outcome {
    pub a: Result<TcpStream>,
    pub b: Result<TcpStream>,
}

pub fn simultaneous_open(
    (a_ns, a): (&Netns, SocketAddr),
    (b_ns, b): (&Netns, SocketAddr),
    timeout: Duration,
) -> Result<Outcome> {
    let (sa, sb) = (keyed_socket(a_ns, a, b)?, keyed_socket(b_ns, b, a)?);
    let first = thread::spawn(move || -> Result<TcpStream> {
        sa.connect_timeout(&b.into(), timeout)
            .with_context(|| format!("{a} connecting to {b}"))?;
        Ok(sa.into())
    });
    thread::sleep(Duration::from_millis(300));
    let second = sb
        .connect_timeout(&a.into(), timeout)
        .with_context(|| format!("{b} connecting to {a}"))
        .map(|()| TcpStream::from(sb));
    let first = first
        .join()
        .map_err(|_| anyhow::anyhow!("the first connect panicked"))?;
    Ok(Outcome {
        a: first,
        b: second,
    })
}
