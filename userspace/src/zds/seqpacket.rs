//! Unix SOCK_SEQPACKET sockets, which std does not offer: one message per packet, and at most
//! one fd beside it (SCM_RIGHTS), as ZDS frames them.
use std::{
    io,
    mem::{size_of, zeroed},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

/// ZDS's largest message; a longer packet is a peer's error, not something to read in parts.
pub const MAX_MESSAGE: usize = 1024;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    let fd = check(unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path longer than sun_path",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

pub struct Listener(OwnedFd);

impl Listener {
    /// Binds `path`, replacing a socket file a previous agent left (a restarted agent takes
    /// over the path ztunnel reconnects to).
    pub fn bind(path: &Path) -> io::Result<Listener> {
        let fd = seqpacket_socket()?;
        let (addr, len) = sockaddr(path)?;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                len,
            )
        })?;
        check(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
        Ok(Listener(fd))
    }

    pub fn accept(&self) -> io::Result<Peer> {
        let fd = check(unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        Ok(Peer(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// One connected ztunnel.
pub struct Peer(OwnedFd);

/// What a received packet was.
pub enum Received {
    Message(usize),
    /// The peer closed its end.
    Closed,
    /// Longer than the buffer: discarded whole.
    Oversized,
}

impl Peer {
    pub fn connect(path: &Path) -> io::Result<Peer> {
        let fd = seqpacket_socket()?;
        let (addr, len) = sockaddr(path)?;
        check(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                len,
            )
        })?;
        Ok(Peer(fd))
    }

    /// A connected pair, for tests of the protocol without a socket file.
    pub fn pair() -> io::Result<(Peer, Peer)> {
        let mut fds = [0; 2];
        check(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })?;
        Ok(unsafe {
            (
                Peer(OwnedFd::from_raw_fd(fds[0])),
                Peer(OwnedFd::from_raw_fd(fds[1])),
            )
        })
    }

    /// How long a receive waits before it fails with `WouldBlock`/`TimedOut`.
    pub fn set_receive_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        check(unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        })
        .map(drop)
    }

    /// Whether the peer hung up or sent something, without waiting: between requests a
    /// ztunnel sends nothing, so either ends its session.
    pub fn hung_up_or_spoke(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one pollfd on a descriptor we own.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        ready > 0
    }

    /// The peer's pid, to name it in logs.
    pub fn peer_pid(&self) -> io::Result<i32> {
        let mut cred: libc::ucred = unsafe { zeroed() };
        let mut len = size_of::<libc::ucred>() as libc::socklen_t;
        check(unsafe {
            libc::getsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut cred).cast(),
                &mut len,
            )
        })?;
        Ok(cred.pid)
    }

    /// Sends one message, with `fd` beside it when given.
    pub fn send(&self, message: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: message.as_ptr() as *mut libc::c_void,
            iov_len: message.len(),
        };
        // Room for one fd, aligned as cmsghdr needs.
        let mut control = [0u64; 4];
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
            debug_assert!(space <= size_of_val(&control));
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
            }
        }
        let sent = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one message into `buf`; fds a peer sends along are closed (ztunnel sends none).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let (n, truncated, _fds) = self.recv_raw(buf)?;
        Ok(match (n, truncated) {
            (_, true) => Received::Oversized,
            (0, _) => Received::Closed,
            (n, _) => Received::Message(n),
        })
    }

    /// Receives one message and the fd passed beside it, if any (the ztunnel side of tests).
    pub fn recv_with_fd(&self, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
        let (n, _, fds) = self.recv_raw(buf)?;
        Ok((n, fds.into_iter().next()))
    }

    fn recv_raw(&self, buf: &mut [u8]) -> io::Result<(usize, bool, Vec<OwnedFd>)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
        let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let truncated = msg.msg_flags & libc::MSG_TRUNC != 0;
        Ok((n as usize, truncated, passed_fds(&msg)))
    }
}

fn passed_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                for i in 0..len / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    fds
}
