//! A minimal DNS client: one A question over UDP or TCP from a pod, and the answer's first
//! address with the address it came from. Enough to see who answered, and what.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use crate::ns::Netns;

const ID: u16 = 0x2a2a;

fn query(name: &str) -> Vec<u8> {
    // Header: id, flags (recursion desired), one question.
    let mut q = ID.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

/// The first A record of an answer to `query(name)`.
fn first_a(answer: &[u8]) -> Result<Ipv4Addr> {
    ensure!(answer.len() >= 12, "short answer ({} bytes)", answer.len());
    ensure!(answer[..2] == ID.to_be_bytes(), "another query's answer");
    ensure!(answer[2] & 0x80 != 0, "not an answer");
    let rcode = answer[3] & 0x0f;
    ensure!(rcode == 0, "rcode {rcode}");
    ensure!(
        u16::from_be_bytes([answer[6], answer[7]]) > 0,
        "no answer records"
    );
    // Skip the question: its name, then type and class.
    let mut at = 12;
    while *answer.get(at).context("truncated question")? != 0 {
        at += 1 + answer[at] as usize;
    }
    at += 5;
    // Each answer: a name (a 2-byte pointer, or labels), type, class, TTL, length, data.
    loop {
        if answer.get(at).context("truncated answer")? & 0xc0 == 0xc0 {
            at += 2;
        } else {
            while *answer.get(at).context("truncated name")? != 0 {
                at += 1 + answer[at] as usize;
            }
            at += 1;
        }
        let head = answer.get(at..at + 10).context("truncated record")?;
        let (kind, len) = (
            u16::from_be_bytes([head[0], head[1]]),
            u16::from_be_bytes([head[8], head[9]]) as usize,
        );
        let data = answer
            .get(at + 10..at + 10 + len)
            .context("truncated data")?;
        if kind == 1 && len == 4 {
            return Ok(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
}

/// Asks `server` for `name`'s A record over UDP from the pod: (address, who answered).
pub fn resolve_udp(ns: &Netns, server: SocketAddr, name: &str) -> Result<(Ipv4Addr, SocketAddr)> {
    let any: SocketAddr = if server.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let sock = ns.exec(move || UdpSocket::bind(any))?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send_to(&query(name), server)?;
    let mut buf = [0u8; 1500];
    let (n, from) = sock.recv_from(&mut buf).context("no DNS answer over UDP")?;
    Ok((first_a(&buf[..n])?, from))
}

/// The same over TCP (two-byte length prefix): (address, the connection's peer).
pub fn resolve_tcp(ns: &Netns, server: SocketAddr, name: &str) -> Result<(Ipv4Addr, SocketAddr)> {
    let mut conn = crate::apps::connect(ns, server, Duration::from_secs(2))?;
    let q = query(name);
    let mut msg = (q.len() as u16).to_be_bytes().to_vec();
    msg.extend(q);
    conn.write_all(&msg)?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len)
        .context("no DNS answer over TCP")?;
    let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
    conn.read_exact(&mut answer)?;
    if answer.is_empty() {
        bail!("empty answer");
    }
    Ok((first_a(&answer)?, conn.peer_addr()?))
}
