//! The control path: applying N pods from empty and one incremental change at each N, eBPF maps
//! (programs attached through TCX, and through tc clsact) against the fallback (ipset + routes),
//! measured in-process around `Dataplane::apply` on the article's node; and the agent's resident
//! memory at each N, measured on the real binary.
//! The N pods sit behind 16 veths, each routing a /20 of 10.200.0.0/16, as a node's pods sit
//! behind their veths: the agent finds each pod's veth from the route to its address.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use zdivert::{
    dataplane::{
        Dataplane,
        ebpf::{self, EbpfDataplane, attach::AttachMode},
        iptables::{self, IptablesDataplane, TunnelChoice},
    },
    state::{NodeState, PodId, PodSpec, ZtunnelSpec},
};
use zdivert_tests::{
    agent::{Agent, Mode},
    eventually, fallback,
    topology::Topology,
};

use crate::stats::Samples;

const VETHS: u32 = 16;
use zdivert_common::BPFFS;
const STATE_DIR: &str = "/run/zdivert";

fn pod_ip(i: u32) -> Ipv4Addr {
    // 10.200.0.0/16, skipping .0 of each /24 for readability.
    Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn state(node: &str, ztunnel: &ZtunnelSpec, pods: u32) -> NodeState {
    let pods = (0..pods)
        .map(|i| {
            let id = PodId {
                namespace: "bench".into(),
                name: format!("p{i}"),
            };
            (
                id,
                PodSpec {
                    ips: vec![IpAddr::V4(pod_ip(i))],
                    ..PodSpec::default()
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    NodeState {
        node: node.into(),
        ztunnel: Some(ztunnel.clone()),
        pods,
        ..NodeState::default()
    }
}

fn pods_file(node: &str, z: &ZtunnelSpec, pods: u32) -> String {
    let mut s = format!(
        "node: {node}\nztunnel: {{ name: {}, ips: [{}], netns: {} }}\npods:\n",
        z.pod.name,
        z.ips[0],
        z.netns
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    for i in 0..pods {
        s += &format!(
            "  - {{ name: p{i}, namespace: bench, ips: [{}] }}\n",
            pod_ip(i)
        );
    }
    s
}

fn rss_kib(pid: u32) -> Result<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("{name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Applies N pods from empty, then one more pod: (from empty, incremental).
fn apply_times(
    dp: &mut dyn Dataplane,
    node: &str,
    z: &ZtunnelSpec,
    n: u32,
) -> Result<(Duration, Duration)> {
    let full = state(node, z, n);
    let t = Instant::now();
    let r = dp.apply(&full)?;
    let from_empty = t.elapsed();
    anyhow::ensure!(
        r.failed.is_empty() && r.captured.len() == n as usize,
        "{}: {} of {n} pods captured, failures {:?}",
        dp.name(),
        r.captured.len(),
        r.failed.first()
    );
    let more = state(node, z, n + 1);
    let t = Instant::now();
    dp.apply(&more)?;
    Ok((from_empty, t.elapsed()))
}

pub fn run(sizes: &[u32], rounds: usize, samples: &mut Samples) -> Result<()> {
    let topo = Topology::article()?;
    let w2 = topo.worker2();
    for k in 0..VETHS {
        w2.ns
            .ip(&format!("link add zbv{k} type veth peer name zbp{k}"))?;
        w2.ns.ip(&format!("link set zbv{k} up"))?;
        w2.ns.ip(&format!("link set zbp{k} up"))?;
        w2.ns.ip(&format!(
            "route add 10.200.{}.0/20 dev zbv{k} scope link",
            k * 16
        ))?;
    }
    let z = ZtunnelSpec {
        pod: PodId {
            namespace: "istio-system".into(),
            name: "ztunnel".into(),
        },
        ips: vec![IpAddr::V4(w2.ztunnel.ip)],
        netns: Some(w2.ztunnel.ns.path()),
    };
    let node = w2.name.clone();
    for &n in sizes {
        for round in 0..rounds {
            // eBPF attached through TCX (the default) and through tc clsact, and the fallback,
            // in a rotating order.
            let mut order = [Mode::Ebpf, Mode::EbpfClsact, Mode::Iptables];
            order.rotate_left(round % 3);
            for mode in order {
                let (node, z) = (node.clone(), z.clone());
                let (full, one) = zdivert::netns::run_in(
                    &w2.ns.path(),
                    move || -> Result<(Duration, Duration)> {
                        let result = match mode {
                            Mode::Ebpf | Mode::EbpfClsact => {
                                let attach = match mode {
                                    Mode::Ebpf => AttachMode::Tcx,
                                    _ => AttachMode::Netlink,
                                };
                                let mut dp =
                                    EbpfDataplane::load(Path::new(BPFFS), &node, attach, false)?;
                                apply_times(&mut dp, &node, &z, n)
                            }
                            _ => {
                                let mut dp = IptablesDataplane::new(
                                    Path::new(STATE_DIR),
                                    &node,
                                    TunnelChoice::Auto,
                                    false,
                                    "the bench's fallback variant",
                                )?;
                                apply_times(&mut dp, &node, &z, n)
                            }
                        };
                        ebpf::cleanup(Path::new(BPFFS), &node)?;
                        if iptables::has_state(Path::new(STATE_DIR), &node) {
                            iptables::cleanup(Path::new(STATE_DIR), &node)?;
                        }
                        result
                    },
                )??;
                let case = format!("{n} pods/{mode}");
                samples.add(
                    "control",
                    &case,
                    "apply_from_empty",
                    "ms",
                    full.as_secs_f64() * 1e3,
                );
                samples.add(
                    "control",
                    &case,
                    "apply_one_more",
                    "ms",
                    one.as_secs_f64() * 1e3,
                );
            }
        }
        // The real agent's memory once it holds N pods, in each mode.
        for mode in [Mode::Ebpf, Mode::Iptables] {
            let agent = Agent::start_with(
                w2,
                &pods_file(&node, &z, n),
                mode,
                &["--health-addr", "off"],
            )?;
            let within = Duration::from_secs(120);
            match mode {
                Mode::Ebpf => eventually(&format!("{n} pods in the map"), within, || {
                    Ok(agent.status()?["pods"].as_array().map_or(0, Vec::len) == n as usize)
                })?,
                _ => eventually(&format!("{n} pods in the ipset"), within, || {
                    Ok(fallback::ipset_members(w2).len() == n as usize)
                })?,
            }
            std::thread::sleep(Duration::from_millis(500));
            let (rss, hwm) = rss_kib(agent.pid().context("agent running")?)?;
            let case = format!("{n} pods/{mode}");
            samples.add("control", &case, "agent_rss", "MiB", rss / 1024.0);
            samples.add("control", &case, "agent_peak_rss", "MiB", hwm / 1024.0);
        }
        eprintln!("bench: control path at {n} pods done");
    }
    Ok(())
}
