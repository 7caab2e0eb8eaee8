//! In-pod mode's control path: how long the redirection of one new pod takes to apply, the eBPF
//! programs (as tc filters, in-pod mode's default, and as TCX links) against istio-cni's rules,
//! on fresh pod netns, in turn. Each is timed as the agent runs it (`PodPrograms::redirect`,
//! `PodRules::redirect`), the object already loaded.
use std::{net::Ipv4Addr, path::Path, time::Instant};

use anyhow::Result;
use zdivert::dataplane::{
    ebpf::attach::AttachMode,
    inpod::{programs::PodPrograms, rules::PodRules},
};
use zdivert_tests::{TempDir, ns::Netns};

use crate::stats::Samples;

/// A pod netns as a CNI leaves it: lo up, eth0 (a veth, its peer kept inside) holding the
/// pod's address.
fn pod_netns(name: &str, ip: Ipv4Addr) -> Result<Netns> {
    let ns = Netns::new(name)?;
    let addr = format!("{ip}/32");
    for args in [
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ][..],
        &["addr", "add", &addr, "dev", "eth0"],
        &["link", "set", "eth0", "up"],
    ] {
        ns.cmd("ip", args)?;
    }
    Ok(ns)
}

pub fn run(pods: usize, samples: &mut Samples) -> Result<()> {
    let node = format!("bench-inpod-{}", std::process::id());
    let bpffs = Path::new(zdivert_common::BPFFS);
    let state = TempDir::new("zdivert-bench-inpod")?;
    let result = (|| -> Result<()> {
        let mut programs = PodPrograms::load(bpffs, &node, AttachMode::Netlink, false)?;
        let mut tcx = PodPrograms::load(bpffs, &format!("{node}-tcx"), AttachMode::Tcx, false)?;
        let mut rules = PodRules::new(&state.0, &node, false)?;
        for i in 0..pods {
            let ip = Ipv4Addr::new(10, 251, (i / 250) as u8, (i % 250) as u8 + 1);
            let order = if i % 2 == 0 {
                ["ebpf", "iptables", "ebpf-tcx"]
            } else {
                ["ebpf-tcx", "iptables", "ebpf"]
            };
            for variant in order {
                let ns = pod_netns(&format!("zdb{}-{i}-{variant}", std::process::id()), ip)?;
                let path = ns.path();
                let t = Instant::now();
                match variant {
                    "ebpf" => programs.redirect(&path, &[ip.into()])?,
                    "ebpf-tcx" => tcx.redirect(&path, &[ip.into()])?,
                    _ => rules.redirect(&path)?,
                };
                let ms = t.elapsed().as_secs_f64() * 1e3;
                samples.add(
                    "control",
                    &format!("in-pod/{variant}"),
                    "apply_one_pod",
                    "ms",
                    ms,
                );
                match variant {
                    "ebpf" => programs.release(&path)?,
                    "ebpf-tcx" => tcx.release(&path)?,
                    _ => rules.release(&path)?,
                }
            }
        }
        Ok(())
    })();
    zdivert::dataplane::ebpf::cleanup(bpffs, &node)?;
    zdivert::dataplane::ebpf::cleanup(bpffs, &format!("{node}-tcx"))?;
    zdivert::dataplane::inpod::rules::cleanup(&state.0, &node)?;
    result
}
