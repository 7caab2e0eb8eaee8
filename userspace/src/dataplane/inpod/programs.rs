//! In-pod redirection with eBPF (`--ztunnel-mode inpod --mode ebpf`): in each ambient pod's
//! netns, `zd_pod_egress` on eth0's egress turns the pod's TCP back through lo, and
//! `zd_pod_ingress` on eth0's and lo's ingress assigns each captured segment to ztunnel's socket
//! (`ebpf/src/inpod/`). No iptables, no conntrack: the contract is istio-cni's (marks 0x539
//! and 0x111, the policy route to the local table), kept by the programs.
//!
//! Links are pinned like the node-level ones (`links/podeg_…`, `podin_…`, `podlo_…`,
//! `podlookup_…`), so a restarted agent swaps its programs in without a gap.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

use aya::Ebpf;
use zdivert_common::{CONFIG_DNS_CAPTURE, POD_COUNTERS};

use super::{
    RECHECK,
    newest::Newest,
    routing::{route_replies, unroute_replies},
};
use crate::{
    dataplane::ebpf::{
        PinDirs, ProgramSet,
        attach::{self, AttachMode, Attachment, Hook},
        lookup::{self, Lookup},
        maps,
        metrics::PacketCounters,
    },
    error::{Error, Result},
    netns,
    nl::Netlink,
};

/// What the turned-back segments need from lo: a source that is the pod's own address
/// (`accept_local`), and for DNS a destination on loopback (`route_localnet`).
const LO_SYSCTLS: [&str; 2] = [
    "/proc/sys/net/ipv4/conf/lo/accept_local",
    "/proc/sys/net/ipv4/conf/lo/route_localnet",
];

pub struct PodPrograms {
    ebpf: Ebpf,
    dirs: PinDirs,
    attach: AttachMode,
    /// Attachment pins this process has swapped its programs into.
    adopted: BTreeSet<String>,
    /// Pod netns (by inode) whose sk_lookup link this process attached.
    lookups: BTreeSet<u64>,
    /// Each redirected pod netns's attachments, by inode.
    redirected: BTreeMap<u64, Vec<Attachment>>,
    /// When each pod netns was last checked in full (routing, sysctls, attachments).
    checked: BTreeMap<u64, Instant>,
    packets: Mutex<Option<PacketCounters>>,
    senders: super::senders::Senders,
    /// Shared with the ZDS sessions, which tell it of every ack.
    newest: Arc<Mutex<Newest>>,
}

impl PodPrograms {
    pub fn load(
        bpffs: &Path,
        node: &str,
        attach: AttachMode,
        dns_capture: bool,
    ) -> Result<PodPrograms> {
        let object = crate::dataplane::ebpf::object();
        if object.is_empty() {
            return Err(Error::NoEbpfObject);
        }
        crate::dataplane::ebpf::ensure_bpffs(bpffs)?;
        let dirs = PinDirs::new(bpffs, node);
        crate::dataplane::ebpf::mkdirs(&dirs)?;
        let mut ebpf = crate::dataplane::ebpf::loader(&dirs.maps).load(object)?;
        ProgramSet::InPod.load(&mut ebpf)?;
        maps::write_config(&mut ebpf, if dns_capture { CONFIG_DNS_CAPTURE } else { 0 })?;
        let packets = PacketCounters::new(maps::Maps::take_stats(&mut ebpf)?, POD_COUNTERS);
        let senders = super::senders::Senders::take(&mut ebpf)?;
        let newest = Arc::new(Mutex::new(Newest::take(&mut ebpf)?));
        Ok(PodPrograms {
            ebpf,
            dirs,
            attach,
            adopted: BTreeSet::new(),
            lookups: BTreeSet::new(),
            redirected: BTreeMap::new(),
            checked: BTreeMap::new(),
            packets: Mutex::new(Some(packets)),
            senders,
            newest,
        })
    }

    /// Redirects the pod whose netns is `ns` and whose addresses are `ips`, idempotently. The
    /// sk_lookup link, routing and sysctls go in before the TC programs: a segment the programs
    /// capture must find everything it needs.
    /// A pod checked within `RECHECK` is not entered again: an apply costs nothing per pod
    /// already set up, and what was taken away behind the agent's back is put back within
    /// `RECHECK`.
    /// Returns how many of its attachments were found gone from the kernel and put back.
    pub fn redirect(&mut self, ns: &Path, ips: &[IpAddr]) -> Result<usize> {
        let inode = netns::inode(ns)?;
        if self.redirected.contains_key(&inode)
            && self
                .checked
                .get(&inode)
                .is_some_and(|t| t.elapsed() < RECHECK)
        {
            return Ok(0);
        }
        if !self.lookups.contains(&inode) {
            lookup::attach(&mut self.ebpf, &self.dirs, Lookup::Pod, ns, inode)?;
            self.lookups.insert(inode);
        }
        let eth0 = netns::run_in(ns, || -> Result<crate::nl::Link> {
            let nl = Netlink::new()?;
            for v6 in [false, true] {
                route_replies(&nl, v6)?;
            }
            for path in LO_SYSCTLS {
                write_sysctl(path, "1")?;
            }
            let index = nl
                .addresses()?
                .into_iter()
                .find(|(_, a)| ips.contains(a))
                .map(|(index, _)| index)
                .ok_or_else(|| Error::PodInterfaceNotFound {
                    netns: ns.into(),
                    ips: ips.to_vec(),
                })?;
            nl.link_by_index(index)
        })??;
        // Before the programs: a query of the pod's must find its addresses.
        self.senders.set(inode, ips, eth0.mac)?;
        let lo = crate::nl::Link {
            name: "lo".into(),
            index: zdivert_common::LOOPBACK_IFINDEX,
            mac: [0; 6],
            is_veth: false,
            peer_netns_id: None,
            peer_index: None,
        };
        let at = |hook, link: &crate::nl::Link| Attachment {
            hook,
            netns_inode: inode,
            ifindex: link.index,
            ifname: link.name.clone(),
            netns: Some(ns.into()),
        };
        let mut wanted = vec![
            at(Hook::InPodIngress, &eth0),
            at(Hook::InPodLoopback, &lo),
            at(Hook::InPodEgress, &eth0),
        ];
        // Last: it drops the pod's TCP that did not cross the egress program.
        match host_veth(&eth0) {
            Ok(veth) => wanted.push(Attachment {
                hook: Hook::InPodGuard,
                netns_inode: netns::inode(Path::new("/proc/self/ns/net"))?,
                ifindex: veth.index,
                ifname: veth.name,
                netns: None,
            }),
            Err(e) if !self.redirected.contains_key(&inode) => log::warn!(
                "netns {}: {e}; a packet socket past the qdisc (PACKET_QDISC_BYPASS) can get \
                 the pod's TCP around ztunnel",
                ns.display()
            ),
            Err(_) => {}
        }
        let ensured = attach::ensure(
            &mut self.ebpf,
            &self.dirs,
            self.attach,
            &wanted,
            &mut self.adopted,
        )?;
        for a in &ensured.repaired {
            log::warn!(
                "{} in netns {} was gone from the kernel: put back",
                a.hook.program(),
                ns.display()
            );
        }
        for (a, ahead) in &ensured.moved_to_head {
            log::warn!(
                "{} in netns {}: {ahead} had got in front of it; moved back to the head",
                a.hook.program(),
                ns.display()
            );
        }
        self.redirected.insert(inode, wanted);
        match ensured.failures.into_iter().next() {
            Some((_, e)) => Err(e),
            None => {
                self.checked.insert(inode, Instant::now());
                Ok(ensured.repaired.len())
            }
        }
    }

    /// The next `redirect` of the netns `inode` checks everything again.
    pub fn recheck(&mut self, inode: u64) {
        self.checked.remove(&inode);
    }

    /// Takes the redirection out of the pod netns at `ns` (the pod left the mesh).
    pub fn release(&mut self, ns: &Path) -> Result<()> {
        let inode = netns::inode(ns)?;
        self.redirected.remove(&inode);
        self.remove_stale()?;
        unroute(ns)
    }

    /// Detaches what no redirected pod needs: pods released, and pods an earlier agent
    /// redirected that are gone.
    pub fn remove_stale(&mut self) -> Result<()> {
        let wanted: Vec<Attachment> = self.redirected.values().flatten().cloned().collect();
        attach::remove_stale(&self.dirs, self.attach, &wanted, &mut self.adopted)?;
        let keep: Vec<u64> = self.redirected.keys().copied().collect();
        lookup::remove_others(&self.dirs, Lookup::Pod, &keep)?;
        self.lookups.retain(|i| keep.contains(i));
        self.checked.retain(|i, _| keep.contains(i));
        (self.newest.lock())
            .unwrap_or_else(|p| p.into_inner())
            .keep_only(&keep.iter().copied().collect());
        self.senders.keep_only(&keep)
    }

    /// What the ZDS sessions call on every ack: the pods' new connections go to the newest
    /// ztunnel (`newest.rs`).
    pub fn on_acked(&self) -> crate::zds::OnAcked {
        let newest = self.newest.clone();
        Arc::new(move |pid, pods| {
            (newest.lock())
                .unwrap_or_else(|p| p.into_inner())
                .acked(pid, pods)
        })
    }

    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let packets = self
            .packets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(packets) = packets {
            registry.register_collector(Box::new(packets));
        }
        (self.newest.lock())
            .unwrap_or_else(|p| p.into_inner())
            .register(registry);
    }
}

/// The node's side of the pod's eth0: the veth in this netns whose peer it is.
fn host_veth(eth0: &crate::nl::Link) -> Result<crate::nl::Link> {
    let unguarded = |why: &str| Error::PodNotGuarded {
        interface: eth0.name.clone(),
        why: why.into(),
    };
    let peer = eth0
        .peer_index
        .filter(|_| eth0.is_veth)
        .ok_or_else(|| unguarded("not a veth"))?;
    let veth = Netlink::new()?
        .link_by_index(peer)
        .map_err(|_| unguarded("its peer is not in the agent's netns"))?;
    if !veth.is_veth || veth.peer_index != Some(eth0.index) {
        return Err(unguarded("its peer is not in the agent's netns"));
    }
    Ok(veth)
}

/// Takes the routing and sysctls of the redirection out of the pod netns at `ns`, once its
/// programs are gone (release, `zdivert cleanup`).
pub fn unroute(ns: &Path) -> Result<()> {
    netns::run_in(ns, || -> Result<()> {
        let nl = Netlink::new()?;
        for v6 in [false, true] {
            unroute_replies(&nl, v6)?;
        }
        for path in LO_SYSCTLS {
            write_sysctl(path, "0")?;
        }
        Ok(())
    })?
}

fn write_sysctl(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| Error::Sysctl {
        path: path.into(),
        source,
    })
}
