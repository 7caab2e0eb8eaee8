//! The ztunnel replacement window: a rolling update of ztunnel on the article's node under
//! long-lived connections and connection churn, eBPF against the fallback. What users see: broken
//! long-lived connections, failed new connections, and stalled ones (a SYN retransmission, 1 s).
use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::Result;
use zdivert_tests::{
    agent::{Agent, Mode},
    apps::{TcpServer, connect, exchange, sa},
    load::{self, Server},
    topology::Topology,
    ztunnel::{MeshConfig, Ztunnel},
};

use crate::stats::Samples;

const CHURN_PORT: u16 = 7000;
const LONG_PORT: u16 = 9080;
/// Long-lived connections per destination (same node, other node).
const LONG_LIVED: usize = 4;

pub fn run(rounds: usize, samples: &mut Samples) -> Result<()> {
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Mode::Ebpf, Mode::Iptables]
        } else {
            [Mode::Iptables, Mode::Ebpf]
        };
        for mode in order {
            let w = window(mode)?;
            let case = format!("ztunnel-replacement/{mode}");
            samples.add(
                "upgrade",
                &case,
                "long_lived_broken",
                "conn",
                w.broken as f64,
            );
            samples.add("upgrade", &case, "new_failed", "conn", w.failed as f64);
            samples.add("upgrade", &case, "new_stalled", "conn", w.stalled as f64);
            samples.add("upgrade", &case, "new_total", "conn", w.total as f64);
            eprintln!("bench: ztunnel replacement round {} {mode} done", round + 1);
        }
    }
    Ok(())
}

struct Window {
    /// Long-lived connections that failed a request after the switch.
    broken: usize,
    failed: usize,
    /// New connections that took longer than a second (a SYN retransmission).
    stalled: usize,
    total: usize,
}

fn window(mode: Mode) -> Result<Window> {
    let topo = Topology::article()?;
    let (w2, w1) = (topo.worker2(), topo.worker());
    let (client, same, cross) = (
        w2.pod("productpage-v1"),
        w2.pod("reviews-v1"),
        w1.pod("details-v1"),
    );
    let _servers = (
        Server::start(&same.ns, CHURN_PORT)?,
        Server::start(&cross.ns, CHURN_PORT)?,
        TcpServer::start(&same.ns, "reviews-v1", LONG_PORT)?,
        TcpServer::start(&cross.ns, "details-v1", LONG_PORT)?,
    );
    let mesh = MeshConfig::default();
    let mut old = Ztunnel::start(&topo, w2, &mesh)?;
    let _z1 = Ztunnel::start(&topo, w1, &mesh)?;
    let agents = topo
        .nodes
        .iter()
        .map(|node| Agent::start_ready(node, mode, &[]))
        .collect::<Result<Vec<_>>>()?;
    let agent = &agents[0];

    let stop = Arc::new(AtomicBool::new(false));
    let mut long = vec![];
    for dst in [same.ip, cross.ip] {
        for _ in 0..LONG_LIVED {
            let conn = connect(&client.ns, sa(dst, LONG_PORT), Duration::from_secs(3))?;
            let flag = stop.clone();
            long.push(thread::spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    if exchange(&conn).is_err() {
                        return true;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                false
            }));
        }
    }
    // Churn to both destinations at once, across the whole window.
    let churn: Vec<_> = [same.ip, cross.ip]
        .map(|ip| {
            let (ns, dst) = (client.ns.path(), SocketAddr::new(ip.into(), CHURN_PORT));
            thread::spawn(move || {
                load::churn(&[ns], dst, 4, load::Amount::For(Duration::from_secs(4)))
            })
        })
        .into();

    // The update: the new pod comes up outside the mesh and becomes the node's ztunnel; a
    // second later the old one is stopped as the kubelet does (SIGTERM). The churn runs 4 s
    // across all of it.
    thread::sleep(Duration::from_millis(500));
    let new_pod = w2.start_pod(
        "ztunnel-v2",
        "istio-system",
        Ipv4Addr::new(10, 244, 2, 11),
        false,
    )?;
    w2.plug_pod(&new_pod)?;
    agent.describe(&w2.pods_file_with(&[&new_pod]))?;
    let _new = Ztunnel::start_in(&topo, w2, &new_pod, &mesh, &[])?;
    agent.describe(&w2.pods_file_for(&new_pod, &[]))?;
    thread::sleep(Duration::from_secs(1));
    // The long-lived connections end before the old ztunnel does (its exit ends its own).
    stop.store(true, Ordering::Relaxed);
    let broken = long
        .into_iter()
        .map(|t| t.join().unwrap_or(true))
        .filter(|b| *b)
        .count();
    old.terminate(Duration::from_secs(10));
    let mut w = Window {
        broken,
        failed: 0,
        stalled: 0,
        total: 0,
    };
    for c in churn {
        let c = c
            .join()
            .map_err(|_| anyhow::anyhow!("churn thread panicked"))??;
        w.failed += c.failures;
        w.total += c.connections + c.failures;
        w.stalled += c
            .times
            .iter()
            .filter(|t| **t > Duration::from_secs(1))
            .count();
    }
    Ok(w)
}
