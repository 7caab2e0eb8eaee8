//! The CNI plugin's ADD, as a runtime runs it (Debian's ptp with host-local, then
//! `zdivert-cni`) against the agent and the real ztunnel, in each mode: in-pod with the eBPF
//! redirection, in-pod with istio-cni's rules, and node-level eBPF. Timed: the whole chain and
//! the plugin's part alone, one pod at a time (p50, p99), and a burst of pods added at once
//! (wall time per pod: what a node pays when many pods start together).
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Result;
use zdivert_tests::{
    TempDir,
    agent::{Agent, Mode, cni_socket, zds_socket},
    cni::{Runtime, Sandbox},
    topology::{Node, Topology},
    ztunnel::{LaterPod, MeshConfig, Ztunnel},
};

use crate::stats::Samples;

fn name(i: usize) -> String {
    format!("cni-{i}")
}

fn ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 2, 100 + i as u8)
}

/// The node description with `count` more ambient pods, no netns (the API never knows one).
fn description(node: &Node, count: usize) -> String {
    let mut entries = String::new();
    for i in 0..count {
        entries += &format!(
            "  - {{ name: {}, namespace: default, ips: [{}], uid: \"cluster1//v1/Pod/default/{}\", serviceAccount: {} }}\n",
            name(i),
            ip(i),
            name(i),
            name(i)
        );
    }
    node.pods_file(true)
        .replacen("pods:\n", &format!("pods:\n{entries}"), 1)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(singles: usize, burst: usize, samples: &mut Samples) -> Result<()> {
    let pods = singles.max(burst);
    anyhow::ensure!(pods <= 150, "10.244.2.100 onwards holds 150 pods");
    for (variant, mode) in [
        ("inpod-ebpf", Mode::InPodEbpf),
        ("inpod-iptables", Mode::InPodIptables),
        ("node-ebpf", Mode::Ebpf),
    ] {
        let topo = Topology::article()?;
        let w2 = topo.worker2();
        let mesh = MeshConfig {
            later: (0..pods)
                .map(|i| LaterPod {
                    node: w2.name.clone(),
                    name: name(i),
                    namespace: "default".into(),
                    ip: ip(i),
                    ambient: true,
                })
                .collect(),
            ..Default::default()
        };
        let options = ["--health-addr", "off"];
        let (_agent, mut ztunnel) = match mode.is_in_pod() {
            true => {
                let agent = Agent::start_ready(w2, mode, &options)?;
                let z =
                    Ztunnel::start_in_pod(&topo, w2, &w2.ztunnel, &mesh, &zds_socket(&w2.name))?;
                (agent, z)
            }
            false => {
                let z = Ztunnel::start(&topo, w2, &mesh)?;
                (Agent::start_ready(w2, mode, &options)?, z)
            }
        };
        ztunnel.wait_ready()?;
        _agent.describe(&description(w2, pods))?;
        let dir = TempDir::new("zdivert-bench-cni")?;
        let runtime = Runtime::ptp(w2, &dir.0.join("ipam"), &cni_socket(&w2.name), None);
        let sandbox = |i: usize| {
            let uid = format!("cluster1//v1/Pod/default/{}", name(i));
            runtime.sandbox(w2, "default", &name(i), &uid, ip(i))
        };
        // One at a time: each pod added, then deleted.
        let (mut chain, mut plugin) = (Vec::new(), Vec::new());
        for i in 0..singles {
            let mut pod = sandbox(i)?;
            let (took, ours) = timed_add(&runtime, &mut pod)?;
            chain.push(took);
            plugin.push(ours);
            runtime.del(&pod)?;
        }
        let case = format!("cni/{variant}");
        for (metric, v) in [
            ("add_p50", percentile(&mut chain, 0.5)),
            ("add_p99", percentile(&mut chain, 0.99)),
            ("zdivert_cni_p50", percentile(&mut plugin, 0.5)),
            ("zdivert_cni_p99", percentile(&mut plugin, 0.99)),
        ] {
            samples.add("cni", &case, metric, "ms", v);
        }
        // A burst: every pod's ADD at once, as after a node reboot or a large rollout.
        let mut sandboxes: Vec<Sandbox> = (0..burst).map(sandbox).collect::<Result<_>>()?;
        let started = Instant::now();
        let outcomes: Vec<Result<(f64, f64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = sandboxes
                .iter_mut()
                .map(|pod| s.spawn(|| timed_add(&runtime, pod)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("ADD thread"))
                .collect()
        });
        let wall = started.elapsed().as_secs_f64() * 1e3;
        let mut each: Vec<f64> = outcomes
            .into_iter()
            .map(|o| o.map(|(t, _)| t))
            .collect::<Result<_>>()?;
        samples.add("cni", &case, "burst_per_pod", "ms", wall / burst as f64);
        samples.add(
            "cni",
            &case,
            "burst_add_p99",
            "ms",
            percentile(&mut each, 0.99),
        );
        for pod in &sandboxes {
            runtime.del(pod)?;
        }
        eprintln!("bench: cni {variant} done");
    }
    Ok(())
}

/// ADD through the list: the whole chain's time and `zdivert-cni`'s alone, in ms.
fn timed_add(runtime: &Runtime, pod: &mut Sandbox) -> Result<(f64, f64)> {
    let (_, per_plugin) = runtime.add_timed(pod)?;
    let total: Duration = per_plugin.iter().map(|(_, d)| *d).sum();
    let ours = per_plugin
        .iter()
        .filter(|(p, _)| p == "zdivert-cni")
        .map(|(_, d)| *d)
        .sum::<Duration>();
    Ok((total.as_secs_f64() * 1e3, ours.as_secs_f64() * 1e3))
}
