//! Load for the data-path benchmark, from and to pods' netns: a server (echo or sink, chosen by
//! the first byte), request/response latency, connection churn, bulk throughput. Every client
//! thread joins the pod's netns once, so its sockets are the pod's.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::ns::Netns;

const ECHO: u8 = b'E';
const SINK: u8 = b'S';
/// One byte back, then the server closes first, as `Connection: close` HTTP does.
const CLOSE_FIRST: u8 = b'C';

fn enter(ns: &Path) -> Result<()> {
    let f = std::fs::File::open(ns)?;
    // SAFETY: setns on an fd we own, for the calling thread only.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns {}: {}",
            ns.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Echo (`E`: every byte back), sink (`S`: count to EOF, answer the count) or close-first (`C`:
/// one byte back, then close) on `port`.
pub struct Server {
    listener: Arc<TcpListener>,
}

impl Server {
    pub fn start(ns: &Netns, port: u16) -> Result<Server> {
        let listener = ns.exec(move || TcpListener::bind(("0.0.0.0", port)))?;
        Ok(Self::serve_on(listener))
    }

    /// The same on `[::]:port`, opened as in-pod ztunnel opens its listeners (`IP_TRANSPARENT`,
    /// `SO_MARK 0x539`): what in-pod redirection delivers to, with no proxy behind it.
    pub fn start_like_in_pod_ztunnel(ns: &Netns, port: u16) -> Result<Server> {
        use socket2::{Domain, Protocol, Socket, Type};
        let listener = ns.exec(move || -> Result<TcpListener> {
            let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
            s.set_only_v6(false)?;
            let on: libc::c_int = 1;
            let mark: libc::c_int = zdivert_common::MARK_INPOD_ZTUNNEL as libc::c_int;
            for (level, name, value) in [
                (libc::SOL_IPV6, libc::IPV6_TRANSPARENT, &on),
                (libc::SOL_SOCKET, libc::SO_MARK, &mark),
            ] {
                // SAFETY: setsockopt on a socket we own, with an int the size it names.
                let r = unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        level,
                        name,
                        (value as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if r != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
            }
            s.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
            s.listen(1024)?;
            Ok(s.into())
        })?;
        Ok(Self::serve_on(listener))
    }

    fn serve_on(listener: TcpListener) -> Server {
        let listener = Arc::new(listener);
        let l = listener.clone();
        thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { break };
                thread::spawn(move || serve(conn));
            }
        });
        Server { listener }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: shutdown on a live fd we own; wakes the accept loop.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

fn serve(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut kind = [0u8];
    if conn.read_exact(&mut kind).is_err() {
        return;
    }
    if kind[0] == CLOSE_FIRST {
        let mut b = [0u8];
        if conn.read_exact(&mut b).is_ok() {
            let _ = conn.write_all(&b);
        }
        return;
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n as u64;
                if kind[0] == ECHO && conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    if kind[0] == SINK {
        let _ = conn.write_all(&total.to_le_bytes());
    }
}

/// Runs `f(i)` on `n` threads inside the netns at `ns`; all start together.
fn in_ns<T: Send + 'static>(
    ns: &Path,
    n: usize,
    f: impl Fn(usize) -> Result<T> + Send + Sync + 'static,
) -> Result<Vec<T>> {
    in_each_ns(&[ns.into()], n, f)
}

/// Runs `f(i)` on `n` threads, thread `i` inside the netns `from[i % from.len()]`; all start
/// together.
fn in_each_ns<T: Send + 'static>(
    from: &[PathBuf],
    n: usize,
    f: impl Fn(usize) -> Result<T> + Send + Sync + 'static,
) -> Result<Vec<T>> {
    let f = Arc::new(f);
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (ns, f, barrier) = (from[i % from.len()].clone(), f.clone(), barrier.clone());
            thread::spawn(move || {
                enter(&ns)?;
                barrier.wait();
                f(i)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))?
        })
        .collect()
}

fn connect(dst: SocketAddr, kind: u8) -> Result<TcpStream> {
    let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(3))
        .with_context(|| format!("connecting to {dst}"))?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(&[kind])?;
    Ok(c)
}

/// `n` one-byte transactions on one connection, after `n / 10` to warm up: each round trip's time.
pub fn request_response(ns: &Path, dst: SocketAddr, n: usize) -> Result<Vec<Duration>> {
    let mut r = in_ns(ns, 1, move |_| {
        let mut c = connect(dst, ECHO)?;
        let mut b = [0u8];
        for _ in 0..n / 10 {
            c.write_all(b"x")?;
            c.read_exact(&mut b)?;
        }
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            c.write_all(b"x")?;
            c.read_exact(&mut b)?;
            times.push(t.elapsed());
        }
        Ok(times)
    })?;
    Ok(r.remove(0))
}

pub struct Churn {
    pub connections: usize,
    pub elapsed: Duration,
    /// Each connection's connect + exchange + close time.
    pub times: Vec<Duration>,
    pub failures: usize,
}

/// How long a churn runs.
#[derive(Clone, Copy, Debug)]
pub enum Amount {
    For(Duration),
    /// Connections per client.
    Each(usize),
}

/// `clients` threads, spread over the netns in `from`, each opening short connections: connect,
/// one byte each way, and the server closes first (FIN, as `Connection: close` HTTP does); the
/// client reads to the end and closes. Nothing is shaped to dodge TIME_WAIT: whoever closes
/// first holds it, as in production.
pub fn churn(from: &[PathBuf], dst: SocketAddr, clients: usize, amount: Amount) -> Result<Churn> {
    let start = Instant::now();
    let per = in_each_ns(from, clients, move |_| {
        let (mut times, mut failures) = (vec![], 0);
        let end = Instant::now() + Duration::from_secs(3600);
        let (deadline, count) = match amount {
            Amount::For(d) => (Instant::now() + d, usize::MAX),
            Amount::Each(n) => (end, n),
        };
        while Instant::now() < deadline && times.len() + failures < count {
            let t = Instant::now();
            let ok = (|| -> Result<()> {
                let mut c = connect(dst, CLOSE_FIRST)?;
                c.write_all(b"x")?;
                let mut answer = Vec::new();
                c.read_to_end(&mut answer)?;
                anyhow::ensure!(answer == b"x", "answer {answer:?}");
                Ok(())
            })();
            match ok {
                Ok(()) => times.push(t.elapsed()),
                Err(_) => failures += 1,
            }
        }
        Ok((times, failures))
    })?;
    let elapsed = start.elapsed();
    let mut out = Churn {
        connections: 0,
        elapsed,
        times: vec![],
        failures: 0,
    };
    for (t, f) in per {
        out.connections += t.len();
        out.times.extend(t);
        out.failures += f;
    }
    Ok(out)
}

/// `streams` connections writing as fast as they can for `duration`: bits per second the sinks
/// counted.
pub fn bulk(ns: &Path, dst: SocketAddr, streams: usize, duration: Duration) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let s2 = stop.clone();
    let timer = thread::spawn(move || {
        thread::sleep(duration);
        s2.store(true, Ordering::Relaxed);
    });
    let counted = in_ns(ns, streams, move |_| {
        let mut c = connect(dst, SINK)?;
        let buf = vec![0x5au8; 1 << 16];
        while !stop.load(Ordering::Relaxed) {
            c.write_all(&buf)?;
        }
        c.shutdown(std::net::Shutdown::Write)?;
        // The sink answers once all in flight has drained through every hop's buffers
        // (ztunnel's included): seconds more than a request's 5 s under emulation.
        c.set_read_timeout(Some(crate::SET_UP_WITHIN))?;
        let mut n = [0u8; 8];
        c.read_exact(&mut n)?;
        Ok(u64::from_le_bytes(n))
    })?;
    let elapsed = start.elapsed();
    let _ = timer.join();
    Ok(counted.iter().sum::<u64>() as f64 * 8.0 / elapsed.as_secs_f64())
}

/// The `q` quantile (0..=1) of `v` (sorted here).
pub fn quantile(v: &mut [Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize]
}
