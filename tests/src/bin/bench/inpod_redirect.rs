//! In-pod redirection alone: productpage-v1's TCP to another pod's address, turned to a local
//! listener opened as in-pod ztunnel opens its own, with no proxy behind it. Through ztunnel the
//! proxy's work dwarfs the redirection's (`datapath::run_in_pod`); here the eBPF programs and
//! istio-cni's rules are all that differs, measured in turn on the same pod.
use std::{net::SocketAddr, path::Path};

use anyhow::{Context, Result};
use zdivert::dataplane::{
    ebpf::attach::AttachMode,
    inpod::{programs::PodPrograms, rules::PodRules},
};
use zdivert_common::PORT_OUTBOUND;
use zdivert_tests::{
    TempDir,
    load::{self, Server},
    topology::Topology,
};

use crate::{datapath::Sizes, stats::Samples};

pub fn run(sizes: &Sizes, samples: &mut Samples) -> Result<()> {
    let topo = Topology::article()?;
    let (pp, rv1) = (
        topo.worker2().pod("productpage-v1"),
        topo.worker2().pod("reviews-v1"),
    );
    let _listener = Server::start_like_in_pod_ztunnel(&pp.ns, PORT_OUTBOUND)?;
    // Never reached: every connection to it is redirected to the local listener.
    let dst = SocketAddr::new(rv1.ip.into(), 7000);
    let ns = pp.ns.path();
    let node = format!("bench-redirect-{}", std::process::id());
    let bpffs = Path::new(zdivert_common::BPFFS);
    let state = TempDir::new("zdivert-bench-redirect")?;
    let result = (|| -> Result<()> {
        let mut programs = PodPrograms::load(bpffs, &node, AttachMode::Netlink, false)?;
        let mut rules = PodRules::new(&state.0, &node, false)?;
        for round in 0..sizes.rounds {
            let order = if round % 2 == 0 {
                ["d-inpod-ebpf", "e-inpod-iptables"]
            } else {
                ["e-inpod-iptables", "d-inpod-ebpf"]
            };
            for variant in order {
                match variant {
                    "d-inpod-ebpf" => programs.redirect(&ns, &[pp.ip.into(), pp.ip6.into()])?,
                    _ => rules.redirect(&ns)?,
                };
                let case = format!("redirect-only/{variant}");
                let mut rr = load::request_response(&ns, dst, sizes.transactions)
                    .with_context(|| format!("{case}: request/response"))?;
                for (metric, q) in [("rr_p50", 0.5), ("rr_p99", 0.99)] {
                    let v = load::quantile(&mut rr, q).as_secs_f64() * 1e6;
                    samples.add("datapath", &case, metric, "µs", v);
                }
                let churn = load::churn(
                    std::slice::from_ref(&ns),
                    dst,
                    16,
                    load::Amount::For(sizes.churn),
                )
                .with_context(|| format!("{case}: churn"))?;
                let rate = churn.connections as f64 / churn.elapsed.as_secs_f64();
                samples.add("datapath", &case, "conn_per_s", "conn/s", rate);
                let bps =
                    load::bulk(&ns, dst, 1, sizes.bulk).with_context(|| format!("{case}: bulk"))?;
                samples.add("datapath", &case, "bulk_1", "Gbit/s", bps / 1e9);
                match variant {
                    "d-inpod-ebpf" => programs.release(&ns)?,
                    _ => rules.release(&ns)?,
                }
                eprintln!("bench: redirect-only round {} {variant} done", round + 1);
            }
        }
        Ok(())
    })();
    zdivert::dataplane::ebpf::cleanup(bpffs, &node)?;
    zdivert::dataplane::inpod::rules::cleanup(&state.0, &node)?;
    result
}
