//! Stand-in workloads: a line-based TCP server that tells each client who it saw (so a test
//! can check which source address reached the pod), a client, and a UDP echo.
use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::ns::Netns;

/// What a server answered: its name, the peer it saw, and the address it was reached at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub server: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

impl Reply {
    fn parse(line: &str) -> Result<Reply> {
        let mut it = line.split_whitespace();
        let (Some(server), Some(peer), Some(local)) = (it.next(), it.next(), it.next()) else {
            bail!("unexpected reply {line:?}");
        };
        Ok(Reply {
            server: server.into(),
            peer: peer.trim_start_matches("peer=").parse()?,
            local: local.trim_start_matches("local=").parse()?,
        })
    }
}

/// A TCP server in a pod, on IPv4 and IPv6: answers each line with
/// `<name> peer=<ip:port> local=<ip:port>`.
pub struct TcpServer {
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    listeners: Vec<Arc<TcpListener>>,
}

fn listener(port: u16, v6: bool) -> Result<TcpListener> {
    let any: SocketAddr = if v6 {
        (Ipv6Addr::UNSPECIFIED, port).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, port).into()
    };
    let s = Socket::new(Domain::for_address(any), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if v6 {
        s.set_only_v6(true)?;
    }
    s.bind(&any.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

impl TcpServer {
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<TcpServer> {
        let peers = Arc::new(Mutex::new(Vec::new()));
        let mut listeners = Vec::new();
        for v6 in [false, true] {
            let l = Arc::new(ns.exec(move || listener(port, v6))?);
            let (l2, p, name) = (l.clone(), peers.clone(), name.to_string());
            thread::spawn(move || {
                for conn in l2.incoming() {
                    let Ok(conn) = conn else { break };
                    let (p, name) = (p.clone(), name.clone());
                    thread::spawn(move || serve(conn, &name, &p));
                }
            });
            listeners.push(l);
        }
        Ok(TcpServer { peers, listeners })
    }

    pub fn seen(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

fn serve(conn: TcpStream, name: &str, peers: &Mutex<Vec<SocketAddr>>) {
    let (Ok(peer), Ok(local)) = (conn.peer_addr(), conn.local_addr()) else {
        return;
    };
    peers.lock().unwrap().push(peer);
    let Ok(mut w) = conn.try_clone() else { return };
    for line in BufReader::new(conn).lines() {
        if line.is_err() || writeln!(w, "{name} peer={peer} local={local}").is_err() {
            break;
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd as _;
        // Wakes the accept loops: shutdown on a listening socket makes accept fail.
        for l in &self.listeners {
            // SAFETY: shutdown on a live fd we own.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// A socket created in the pod's netns, connected to `dst`.
pub fn connect(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    connect_from(ns, 0, dst, timeout)
}

/// As `connect`, from source port `sport` (0: the kernel's choice).
pub fn connect_from(
    ns: &Netns,
    sport: u16,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    let sock = ns.exec(move || -> Result<Socket> {
        let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        if sport != 0 {
            let any: SocketAddr = match dst {
                SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, sport).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, sport).into(),
            };
            s.bind(&any.into())
                .with_context(|| format!("binding source port {sport}"))?;
        }
        Ok(s)
    })?;
    sock.connect_timeout(&dst.into(), timeout)
        .with_context(|| format!("connecting to {dst}"))?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(timeout))?;
    Ok(stream)
}

/// One request on a new connection from the pod: connect, send a line, read the answer.
pub fn request(ns: &Netns, dst: SocketAddr) -> Result<Reply> {
    request_timeout(ns, dst, Duration::from_secs(3))
}

pub fn request_timeout(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<Reply> {
    let conn = connect(ns, dst, timeout)?;
    exchange(&conn)
}

/// One line out, one line back, on an open connection.
pub fn exchange(conn: &TcpStream) -> Result<Reply> {
    let mut w = conn;
    w.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .context("reading the reply")?;
    Reply::parse(&line)
}

/// A UDP echo in a pod that prefixes the peer it saw.
pub struct UdpEcho {
    sock: Arc<UdpSocket>,
    received: Arc<std::sync::atomic::AtomicUsize>,
}

impl UdpEcho {
    pub fn start(ns: &Netns, port: u16) -> Result<UdpEcho> {
        let sock = Arc::new(ns.exec(move || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))?);
        let (s, received) = (
            sock.clone(),
            Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        );
        let count = received.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = s.recv_from(&mut buf) {
                if n == 0 {
                    break;
                }
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let msg = format!("{peer} {}", String::from_utf8_lossy(&buf[..n]));
                let _ = s.send_to(msg.as_bytes(), peer);
            }
        });
        Ok(UdpEcho { sock, received })
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: shutdown on a live fd we own; wakes recv_from.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// Sends one datagram from the pod and returns the echo: `<peer the server saw> <payload>`.
pub fn udp_request(ns: &Netns, dst: SocketAddr) -> Result<String> {
    let sock = ns.exec(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send_to(b"ping", dst)?;
    let mut buf = [0u8; 512];
    let (n, _) = sock.recv_from(&mut buf).context("no UDP echo")?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Requests from a pod, one after another on new connections, until stopped: what a workload
/// sees while the dataplane changes underneath it.
pub struct RequestStream {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    thread: thread::JoinHandle<Vec<Timed>>,
}

/// One request's outcome (the peer the server saw) and how long it took.
pub type Timed = (Result<IpAddr>, Duration);

impl RequestStream {
    pub fn start(ns: &Netns, dst: SocketAddr) -> Result<RequestStream> {
        Self::start_timeout(ns, dst, Duration::from_secs(3))
    }

    /// Each request given up after `timeout`: a dropped SYN costs one attempt, not three
    /// seconds of retransmissions, so every moment gets a fresh SYN.
    pub fn start_timeout(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<RequestStream> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let (flag, count, ns) = (stop.clone(), done.clone(), Netns::attach(&ns.path())?);
        let thread = thread::spawn(move || {
            let mut results = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                let outcome = request_timeout(&ns, dst, timeout).map(|r| r.peer.ip());
                results.push((outcome, started.elapsed()));
                count.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(5));
            }
            results
        });
        Ok(RequestStream { stop, done, thread })
    }

    /// Waits until `n` more requests have finished (however they ended): traffic went on
    /// across whatever the test just did.
    pub fn wait_more(&self, n: usize) -> Result<()> {
        wait_count(&self.done, n, "request stream")
    }

    /// How many requests have finished so far.
    pub fn finished(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Stops the stream; each request's outcome (the peer the server saw).
    pub fn stop(self) -> Vec<Result<IpAddr>> {
        self.stop_timed().into_iter().map(|(r, _)| r).collect()
    }

    /// Stops the stream; each request's outcome and duration.
    pub fn stop_timed(self) -> Vec<Timed> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("request stream panicked")
    }
}

/// One connection, a request on it every 20 ms until stopped: each request's outcome.
pub struct LongLived {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    thread: thread::JoinHandle<Vec<Result<(), String>>>,
}

impl LongLived {
    pub fn start(ns: &Netns, to: SocketAddr) -> Result<LongLived> {
        let conn = connect(ns, to, Duration::from_secs(3))?;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (stop.clone(), done.clone());
        let thread = thread::spawn(move || {
            let mut out = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                out.push(exchange(&conn).map(|_| ()).map_err(|e| format!("{e:#}")));
                count.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(20));
            }
            // A normal close.
            let _ = conn.shutdown(std::net::Shutdown::Both);
            out
        });
        Ok(LongLived { stop, done, thread })
    }

    /// Requests done so far.
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests have finished on the connection.
    pub fn wait_more(&self, n: usize) -> Result<()> {
        wait_count(&self.done, n, "long-lived connection")
    }

    pub fn stop(self) -> Vec<Result<(), String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("long-lived connection thread")
    }
}

fn wait_count(count: &AtomicUsize, n: usize, what: &str) -> Result<()> {
    let target = count.load(Ordering::Relaxed) + n;
    crate::eventually(
        &format!("{n} more requests on the {what}"),
        Duration::from_secs(20),
        || Ok(count.load(Ordering::Relaxed) >= target),
    )
}
