//! A stand-in ztunnel: a real L4 transparent proxy in ztunnel's netns, forwarding as ztunnel did
//! in the article's mode, and recording what it saw so tests can assert on the path.
//!
//! - :15001 (outbound): the accepted socket's local address is the original destination. A
//!   Service VIP is resolved to its endpoint. A pod on this node is reached directly with the
//!   client's address as source (IP_TRANSPARENT bind); a pod elsewhere through *that pod's* IP on
//!   port 15008 (its node's inbound capture hands it to its ztunnel), with a one-line header
//!   `ZDHBONE <original source> <destination>` standing in for HBONE's CONNECT.
//! - :15008 (HBONE): reads the header and connects to the destination as the original source.
//! - :15006 (plain inbound): connects to the original destination as the client.
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::ns::Netns;

pub const OUTBOUND: u16 = 15001;
pub const INBOUND: u16 = 15006;
pub const HBONE: u16 = 15008;

/// One connection accepted by the stand-in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub listener: u16,
    /// The peer as the listener saw it.
    pub peer: SocketAddr,
    /// The accepted socket's local address: the original destination.
    pub orig_dst: SocketAddr,
    /// From the HBONE header, on :15008.
    pub hbone: Option<(SocketAddr, SocketAddr)>,
    /// Where the stand-in connected, and from which address.
    pub upstream: Option<(SocketAddr, SocketAddr)>,
}

#[derive(Clone)]
pub struct Config {
    pub ztunnel_ip: Ipv4Addr,
    pub ztunnel_ip6: Ipv6Addr,
    /// This node's pod CIDRs as (network, prefix length): destinations reached directly.
    pub local_cidr: (Ipv4Addr, u8),
    pub local_cidr6: (Ipv6Addr, u8),
    /// Service VIP → endpoint.
    pub services: Vec<(SocketAddr, SocketAddr)>,
    /// Explicit-proxy listeners (nothing captured; the benchmark's baseline): a client connects
    /// to ztunnel's own address on `port` and is forwarded from ztunnel's own address.
    pub explicit: Vec<Explicit>,
}

#[derive(Clone, Debug)]
pub struct Explicit {
    pub port: u16,
    pub target: SocketAddr,
    /// A pod on another node: through that node's ztunnel (:15008), as the captured path goes.
    pub via: Option<SocketAddr>,
}

struct Shared {
    cfg: Config,
    records: Mutex<Vec<Record>>,
    ns_path: std::path::PathBuf,
}

pub struct Standin {
    shared: Arc<Shared>,
    listeners: Vec<Arc<TcpListener>>,
}

impl Standin {
    pub fn start(ns: &Netns, cfg: Config) -> Result<Standin> {
        let shared = Arc::new(Shared {
            cfg,
            records: Mutex::new(Vec::new()),
            ns_path: ns.path(),
        });
        let mut listeners = Vec::new();
        let explicit: Vec<u16> = shared.cfg.explicit.iter().map(|e| e.port).collect();
        let ports = [OUTBOUND, INBOUND, HBONE];
        let all = ports
            .iter()
            .flat_map(|p| [(*p, false), (*p, true)])
            .chain(explicit.into_iter().map(|p| (p, false)));
        for (port, v6) in all {
            let l = Arc::new(ns.exec(move || transparent_listener(port, v6))?);
            let (l2, sh) = (l.clone(), shared.clone());
            thread::spawn(move || {
                // The accept thread and the handlers it spawns live in ztunnel's netns: their
                // upstream sockets are created there, with no setns per connection.
                if let Err(e) = enter(&sh.ns_path) {
                    eprintln!("stand-in ztunnel :{port}: {e:#}");
                    return;
                }
                for conn in l2.incoming() {
                    let Ok(conn) = conn else { break };
                    let sh = sh.clone();
                    thread::spawn(move || {
                        if let Err(e) = handle(&sh, port, conn) {
                            eprintln!("stand-in ztunnel :{port}: {e:#}");
                        }
                    });
                }
            });
            listeners.push(l);
        }
        Ok(Standin { shared, listeners })
    }

    pub fn records(&self) -> Vec<Record> {
        self.shared.records.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.shared.records.lock().unwrap().clear();
    }

    /// Records whose original destination is `dst`.
    pub fn to(&self, dst: SocketAddr) -> Vec<Record> {
        self.records()
            .into_iter()
            .filter(|r| r.orig_dst == dst)
            .collect()
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        for l in &self.listeners {
            // SAFETY: shutdown on a live fd we own; wakes the accept loop.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// `IP_TRANSPARENT`, or `IPV6_TRANSPARENT` on an IPv6 socket: it may accept connections for,
/// and bind to, addresses that are not its own.
fn set_transparent(s: &Socket, v6: bool) -> Result<()> {
    if !v6 {
        return Ok(s.set_ip_transparent(true)?);
    }
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("IPV6_TRANSPARENT: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn transparent_listener(port: u16, v6: bool) -> Result<TcpListener> {
    let (domain, any) = if v6 {
        (Domain::IPV6, IpAddr::V6(Ipv6Addr::UNSPECIFIED))
    } else {
        (Domain::IPV4, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if v6 {
        s.set_only_v6(true)?;
    }
    set_transparent(&s, v6)?;
    s.bind(&SocketAddr::new(any, port).into())?;
    s.listen(1024)?;
    Ok(s.into())
}

fn in_cidr(ip: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

fn in_cidr6(ip: Ipv6Addr, (net, len): (Ipv6Addr, u8)) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    u128::from(ip) & mask == u128::from(net) & mask
}

impl Config {
    fn is_local(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => in_cidr(v4, self.local_cidr),
            IpAddr::V6(v6) => in_cidr6(v6, self.local_cidr6),
        }
    }

    /// ztunnel's own address of `ip`'s family.
    fn own(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => IpAddr::V4(self.ztunnel_ip),
            IpAddr::V6(_) => IpAddr::V6(self.ztunnel_ip6),
        }
    }
}

fn enter(ns: &std::path::Path) -> Result<()> {
    let file = std::fs::File::open(ns)?;
    // SAFETY: setns on an fd we own, for the calling thread only.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A socket bound to `src` (transparently if it is not ztunnel's), connected to `dst`; created
/// by a handler thread, so in ztunnel's netns.
fn connect_from(sh: &Shared, src: IpAddr, dst: SocketAddr) -> Result<TcpStream> {
    let spoof = src != sh.cfg.own(src);
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if spoof {
        set_transparent(&s, dst.is_ipv6())?;
    }
    s.set_nodelay(true)?;
    // The port is picked at connect time, against the full 4-tuple, as proxies do: a bind to
    // port 0 would search ports still in TIME_WAIT on this address, slower with every
    // connection of a churn.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.connect_timeout(&dst.into(), Duration::from_secs(3))
        .with_context(|| format!("{src} -> {dst}"))?;
    Ok(s.into())
}

fn handle(sh: &Shared, port: u16, mut conn: TcpStream) -> Result<()> {
    conn.set_nodelay(true)?;
    let peer = conn.peer_addr()?;
    let orig_dst = conn.local_addr()?;
    let mut rec = Record {
        listener: port,
        peer,
        orig_dst,
        hbone: None,
        upstream: None,
    };
    let (upstream, header) = match port {
        OUTBOUND => {
            let target = sh
                .cfg
                .services
                .iter()
                .find(|(vip, _)| *vip == orig_dst)
                .map_or(orig_dst, |(_, ep)| *ep);
            if sh.cfg.is_local(target.ip()) {
                (connect_from(sh, peer.ip(), target)?, None)
            } else {
                let hop = SocketAddr::new(target.ip(), HBONE);
                let s = connect_from(sh, sh.cfg.own(target.ip()), hop)?;
                (s, Some(format!("ZDHBONE {peer} {target}\n")))
            }
        }
        HBONE => {
            let line = read_line(&mut conn)?;
            let mut it = line.split_whitespace();
            let (Some("ZDHBONE"), Some(src), Some(dst)) = (it.next(), it.next(), it.next()) else {
                sh.records.lock().unwrap().push(rec);
                let _ = conn.write_all(b"ztunnel: HBONE header required\n");
                return Ok(());
            };
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse()?, dst.parse()?);
            rec.hbone = Some((src, dst));
            // An explicit client (unspecified source) is forwarded from ztunnel's own address.
            let from = if src.ip().is_unspecified() {
                sh.cfg.own(dst.ip())
            } else {
                src.ip()
            };
            (connect_from(sh, from, dst)?, None)
        }
        p if let Some(e) = sh.cfg.explicit.iter().find(|e| e.port == p) => {
            let own = sh.cfg.own(e.target.ip());
            match e.via {
                None => (connect_from(sh, own, e.target)?, None),
                Some(via) => {
                    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
                    let header = format!("ZDHBONE {any} {}\n", e.target);
                    (connect_from(sh, own, via)?, Some(header))
                }
            }
        }
        _ => (connect_from(sh, peer.ip(), orig_dst)?, None),
    };
    rec.upstream = Some((upstream.peer_addr()?, upstream.local_addr()?));
    sh.records.lock().unwrap().push(rec);
    let mut up = upstream;
    if let Some(h) = header {
        up.write_all(h.as_bytes())?;
    }
    splice(conn, up)
}

/// The header line, read byte by byte so nothing after it is consumed.
fn read_line(conn: &mut TcpStream) -> Result<String> {
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut line = Vec::new();
    let mut b = [0u8];
    while line.len() < 256 {
        if conn.read(&mut b)? == 0 || b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    conn.set_read_timeout(None)?;
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Copies both ways until each side closes, half-closing as TCP does.
fn splice(a: TcpStream, b: TcpStream) -> Result<()> {
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    let t = thread::spawn(move || {
        pump(&a2, &b2);
        let _ = b2.shutdown(std::net::Shutdown::Write);
    });
    pump(&b, &a);
    let _ = a.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
    Ok(())
}

/// `from` → `to` until EOF through a 64 KiB buffer. Not splice(2): zero-copy was tried, and on
/// this kernel a spliced 1-byte segment can sit in the send queue under the persist timer on the
/// fallback's cross-node path, stalling request/response traffic; a copy behaves the same in
/// every mode, which is what a side-by-side comparison needs.
fn pump(mut from: &TcpStream, mut to: &TcpStream) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
