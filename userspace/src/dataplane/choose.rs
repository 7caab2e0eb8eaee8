//! Which dataplane a node runs, and the removal of what the other one left: two dataplanes must
//! never capture at once.
use std::path::Path;

use super::{
    Dataplane,
    ebpf::{self, EbpfDataplane, attach::AttachMode},
    iptables::{self, IptablesDataplane, TunnelChoice},
};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Ebpf,
    Iptables,
    /// eBPF where the kernel can run the programs, else the iptables fallback.
    Auto,
}

pub struct Options<'a> {
    pub bpffs: &'a Path,
    pub state_dir: &'a Path,
    pub node: &'a str,
    pub tunnel: TunnelChoice,
    pub attach: AttachMode,
    pub dns_capture: bool,
}

/// A build without the eBPF object must never look like a kernel without BPF: `auto` would
/// quietly run the fallback on every node of the DaemonSet.
pub fn check_object(mode: Mode, object: &[u8]) -> Result<()> {
    match mode {
        Mode::Iptables => Ok(()),
        _ if object.is_empty() => Err(Error::NoEbpfObject),
        _ => Ok(()),
    }
}

/// Builds the dataplane `mode` asks for, after removing whatever the other mode left.
pub fn build(mode: Mode, o: &Options) -> Result<Box<dyn Dataplane>> {
    check_object(mode, ebpf::object())?;
    let fallback_because = match mode {
        Mode::Ebpf => None,
        Mode::Iptables => Some("--mode iptables".to_string()),
        Mode::Auto => match ebpf::probe(o.bpffs, o.attach, ebpf::ProgramSet::NodeLevel) {
            Ok(()) => {
                log::info!(
                    "mode auto: eBPF (programs load, {} attaches, bpf_sk_assign usable)",
                    o.attach
                );
                None
            }
            Err(why) => {
                log::warn!("mode auto: iptables fallback, because {why}");
                Some(format!("--mode auto, and {why}"))
            }
        },
    };
    let use_ebpf = fallback_because.is_none();
    if use_ebpf {
        if iptables::has_state(o.state_dir, o.node) {
            iptables::cleanup(o.state_dir, o.node)?;
            log::info!("removed the iptables layout an earlier agent left");
        }
        let dp = EbpfDataplane::load(o.bpffs, o.node, o.attach, o.dns_capture)?;
        log::info!(
            "ebpf dataplane for node {}, attached through {}, pins under {}",
            o.node,
            o.attach,
            dp.dirs().root.display()
        );
        Ok(Box::new(dp))
    } else {
        let c = super::cleanup_ebpf(o.bpffs, o.node)?;
        if c.links + c.maps > 0 {
            log::info!("removed the eBPF programs and maps an earlier agent left");
        }
        let why = fallback_because.unwrap_or_default();
        let dp = IptablesDataplane::new(o.state_dir, o.node, o.tunnel, o.dns_capture, &why)?;
        log::info!(
            "iptables dataplane for node {} ({} tunnels), state in {}",
            o.node,
            dp.tunnel(),
            dp.state_file().display()
        );
        Ok(Box::new(dp))
    }
}

/// In-pod mode: the pods' redirection `mode` asks for (eBPF programs in each pod's netns, or
/// istio-cni's rules), decided as for the node-level dataplanes.
pub fn in_pod_redirection(mode: Mode, o: &Options) -> Result<super::inpod::Redirection> {
    use super::inpod::{Redirection, programs::PodPrograms, rules::PodRules};
    let Options {
        bpffs,
        state_dir,
        node,
        attach,
        dns_capture,
        ..
    } = *o;
    check_object(mode, ebpf::object())?;
    let (use_ebpf, choice) = match mode {
        // The programs may load where the assignment they live by is refused (a kernel before
        // 6.5 and ztunnel's SO_REUSEPORT listeners): every captured segment would be dropped.
        Mode::Ebpf => match ebpf::probe(bpffs, attach, ebpf::ProgramSet::InPod) {
            Ok(()) => (true, "eBPF programs in each pod (--mode ebpf)".to_string()),
            Err(why) => {
                return Err(Error::EbpfUnusable {
                    mode: "in-pod",
                    why,
                });
            }
        },
        Mode::Iptables => (false, "istio-cni's rules (--mode iptables)".to_string()),
        Mode::Auto => match ebpf::probe(bpffs, attach, ebpf::ProgramSet::InPod) {
            Ok(()) => (
                true,
                "eBPF programs in each pod (--mode auto: the kernel runs them)".to_string(),
            ),
            Err(why) => {
                log::warn!("mode auto: in-pod iptables rules, because {why}");
                (false, format!("istio-cni's rules (--mode auto, and {why})"))
            }
        },
    };
    super::inpod::record_choice(state_dir, node, &choice)?;
    if !use_ebpf {
        return Ok(Redirection::Iptables(PodRules::new(
            state_dir,
            node,
            dns_capture,
        )?));
    }
    let programs = PodPrograms::load(bpffs, node, attach, dns_capture)?;
    log::info!("in-pod eBPF redirection for node {node}, attached through {attach}");
    Ok(Redirection::Ebpf(Box::new(programs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_without_the_ebpf_object_refuses_every_mode_but_iptables() {
        for mode in [Mode::Ebpf, Mode::Auto] {
            assert!(
                matches!(check_object(mode, &[]), Err(Error::NoEbpfObject)),
                "{mode:?}"
            );
            assert!(check_object(mode, b"\x7fELF").is_ok(), "{mode:?}");
        }
        assert!(check_object(Mode::Iptables, &[]).is_ok());
    }
}
