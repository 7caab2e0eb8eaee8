//! The eBPF dataplane: TC programs on the pods' and ztunnel's veths, maps and links pinned under
//! `<bpffs>/zdivert/<PIN_VERSION>/<node>/{maps,links,filters}`.
pub mod attach;
mod cleanup;
pub mod lookup;
pub mod maps;
pub mod metrics;
mod migrate;
mod probe;
mod programs;
pub mod status;
mod ztunnels;

pub use cleanup::{Cleaned, cleanup};
pub use migrate::Migrated;
pub use probe::{probe, probe_logging, sweep_stale};
pub use programs::ProgramSet;
pub(crate) use programs::rejected;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::{Ebpf, EbpfLoader};
use zdivert_common::{
    MARK_MASK, MARK_TPROXY, PIN_BASE, PIN_VERSION, ZTUNNEL_TPROXY_RULE_PRIORITY,
    ZTUNNEL_TPROXY_TABLE,
};

use self::attach::{AttachMode, Attachment, Hook};
use super::{Dataplane, Report};
use crate::{
    error::{Error, Result},
    facts::{self, NodeFacts},
    netns,
    nl::{Netlink, PolicyRule, RuleTarget},
    state::{NodeState, PodId},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zdivert.bpf.o"));

/// The embedded eBPF object (empty when built without `cargo xtask build-ebpf`).
pub fn object() -> &'static [u8] {
    OBJECT
}

/// In ztunnel's netns: packets the tproxy program assigned to a socket are delivered locally.
pub const TPROXY_RULE: PolicyRule = PolicyRule::fwmark(
    ZTUNNEL_TPROXY_RULE_PRIORITY,
    MARK_TPROXY,
    MARK_MASK,
    RuleTarget::Table(ZTUNNEL_TPROXY_TABLE),
);

/// Where a node's pinned state lives.
#[derive(Clone, Debug)]
pub struct PinDirs {
    pub root: PathBuf,
    pub maps: PathBuf,
    /// TCX links.
    pub links: PathBuf,
    /// The programs of tc clsact filters (kernels without TCX).
    pub filters: PathBuf,
}

impl PinDirs {
    pub fn new(bpffs: &Path, node: &str) -> Self {
        Self::of_version(bpffs, PIN_VERSION, node)
    }

    /// A node's pinned state in the layout of pin version `version`.
    pub fn of_version(bpffs: &Path, version: &str, node: &str) -> Self {
        let root = bpffs.join(PIN_BASE).join(version).join(node);
        PinDirs {
            maps: root.join("maps"),
            links: root.join("links"),
            filters: root.join("filters"),
            root,
        }
    }
}

/// A loader that creates each map of the object pinned in `maps_dir`, or reuses the map pinned
/// there: BTF maps carry no pinning of their own, so every one is named here.
pub fn loader(maps_dir: &Path) -> EbpfLoader<'static> {
    lift_memlock_limit();
    // The programs that used a retired map keep it until they are swapped out.
    for name in zdivert_common::map::RETIRED {
        let _ = std::fs::remove_file(maps_dir.join(name));
    }
    let mut loader = EbpfLoader::new();
    for name in zdivert_common::map::ALL {
        loader.map_pin_path(name, maps_dir.join(name));
    }
    loader
}

/// Before 5.11 the kernel charges BPF maps and programs to the user's locked memory, checked
/// against the loading process's RLIMIT_MEMLOCK (often 64 KiB or 8 MiB): with every root
/// process's maps counted together, a load fails with EPERM. Later kernels account to the
/// memory cgroup and ignore the limit. Lifted once per process, as libbpf does.
pub fn lift_memlock_limit() {
    static LIFTED: std::sync::Once = std::sync::Once::new();
    LIFTED.call_once(|| {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid struct; it changes only this process's limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
            return;
        }
        // Without CAP_SYS_RESOURCE only the soft limit can rise, up to the hard one.
        let refused = std::io::Error::last_os_error();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with valid structs, this process only.
        let raised = unsafe {
            libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) == 0 && {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) == 0
            }
        };
        log::info!(
            "RLIMIT_MEMLOCK: no infinity ({refused}); {}: kernels before 5.11 charge BPF maps to it",
            match raised {
                true => format!("raised to the hard limit, {} bytes", limit.rlim_max),
                false => "left as it is".to_string(),
            }
        );
    });
}

pub struct EbpfDataplane {
    ebpf: Ebpf,
    maps: maps::Maps,
    /// Handed to the metrics registry once (`register_metrics`).
    packets: std::sync::Mutex<Option<metrics::PacketCounters>>,
    dirs: PinDirs,
    attach: AttachMode,
    nl: Netlink,
    node_netns_inode: u64,
    /// Attachment pins this process has already swapped its programs into.
    adopted: BTreeSet<String>,
    /// The current ztunnel's netns and a replaced one's that still drains.
    ztunnels: ztunnels::Ztunnels,
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

pub(crate) fn ensure_bpffs(bpffs: &Path) -> Result<()> {
    let c =
        std::ffi::CString::new(bpffs.as_os_str().as_encoded_bytes()).map_err(|e| Error::Bpffs {
            path: bpffs.into(),
            source: e.into(),
        })?;
    // SAFETY: statfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::Bpffs {
            path: bpffs.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(Error::NotBpffs { path: bpffs.into() });
    }
    Ok(())
}

pub(crate) fn mkdirs(dirs: &PinDirs) -> Result<()> {
    for d in [&dirs.maps, &dirs.links, &dirs.filters] {
        std::fs::create_dir_all(d).map_err(|source| Error::Bpffs {
            path: d.clone(),
            source,
        })?;
    }
    Ok(())
}

impl EbpfDataplane {
    /// Loads the programs, reusing the node's pinned maps if an earlier agent left them;
    /// programs will be attached through `attach`. `dns_capture`: ambient pods' DNS goes to
    /// ztunnel's DNS proxy.
    pub fn load(bpffs: &Path, node: &str, attach: AttachMode, dns_capture: bool) -> Result<Self> {
        if OBJECT.is_empty() {
            return Err(Error::NoEbpfObject);
        }
        ensure_bpffs(bpffs)?;
        let dirs = PinDirs::new(bpffs, node);
        mkdirs(&dirs)?;
        let mut ebpf = loader(&dirs.maps).load(OBJECT)?;
        ProgramSet::NodeLevel.load(&mut ebpf)?;
        let config = if dns_capture {
            zdivert_common::CONFIG_DNS_CAPTURE
        } else {
            0
        };
        // Before anything reads the pins: an older agent's attachments become this layout's.
        migrate::from_previous(bpffs, node, &dirs)?;
        let maps = maps::Maps::take(&mut ebpf, config)?;
        let packets = metrics::PacketCounters::new(
            maps::Maps::take_stats(&mut ebpf)?,
            zdivert_common::COUNTERS,
        );
        let nl = Netlink::new()?;
        let pins: Vec<_> = attach::all_pinned(&dirs)?
            .into_iter()
            .map(|(_, _, p)| p)
            .collect();
        let ztunnels = ztunnels::Ztunnels::adopt(&nl, &maps.draining()?, &pins);
        Ok(EbpfDataplane {
            ebpf,
            maps,
            packets: std::sync::Mutex::new(Some(packets)),
            dirs,
            attach,
            nl,
            node_netns_inode: netns::inode(Path::new("/proc/self/ns/net"))?,
            adopted: BTreeSet::new(),
            ztunnels,
        })
    }

    pub fn dirs(&self) -> &PinDirs {
        &self.dirs
    }

    /// Each attachment the node needs, with the pods that need it (in a ptp network no two pods
    /// share a veth, but nothing here relies on it).
    fn attachments(&self, facts: &NodeFacts) -> BTreeMap<Attachment, Vec<PodId>> {
        let node = |hook, link: &crate::nl::Link| Attachment {
            hook,
            netns_inode: self.node_netns_inode,
            ifindex: link.index,
            ifname: link.name.clone(),
            netns: None,
        };
        let mut out: BTreeMap<Attachment, Vec<PodId>> = BTreeMap::new();
        for z in self.ztunnels.all(facts.ztunnel.as_ref()) {
            out.entry(node(Hook::ZtunnelReturn, &z.host_veth))
                .or_default()
                .push(z.pod.clone());
            let tproxy = Attachment {
                hook: Hook::ZtunnelTproxy,
                netns_inode: z.netns_inode,
                ifindex: z.eth0.index,
                ifname: z.eth0.name.clone(),
                netns: Some(z.netns.clone()),
            };
            out.entry(tproxy).or_default().push(z.pod.clone());
        }
        for (id, pod) in &facts.pods {
            for hook in [Hook::PodOutbound, Hook::PodInbound] {
                out.entry(node(hook, &pod.veth))
                    .or_default()
                    .push(id.clone());
            }
        }
        out
    }

    /// The hold attachments of veths in the node's netns.
    fn holds<'a>(&self, links: impl IntoIterator<Item = &'a crate::nl::Link>) -> Vec<Attachment> {
        links
            .into_iter()
            .flat_map(|l| {
                [Hook::HoldOutbound, Hook::HoldInbound].map(|hook| Attachment {
                    hook,
                    netns_inode: self.node_netns_inode,
                    ifindex: l.index,
                    ifname: l.name.clone(),
                    netns: None,
                })
            })
            .collect()
    }
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn hold(&mut self, links: &[crate::nl::Link]) -> Result<()> {
        mkdirs(&self.dirs)?;
        // A veth captured before the link watch told of it (the CNI plugin's ADD can come
        // first) is not held: a hold would take its filter over, and its release then leave
        // the veth with no program at all.
        let captured: BTreeSet<u32> = attach::all_pinned(&self.dirs)?
            .into_iter()
            .filter(|(_, _, p)| !p.hook.is_hold() && p.netns_inode == self.node_netns_inode)
            .map(|(_, _, p)| p.ifindex)
            .collect();
        let new: Vec<crate::nl::Link> = links
            .iter()
            .filter(|l| !captured.contains(&l.index))
            .cloned()
            .collect();
        let holds = self.holds(&new);
        let ensured = attach::ensure(
            &mut self.ebpf,
            &self.dirs,
            self.attach,
            &holds,
            &mut self.adopted,
        )?;
        match ensured.failures.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let packets = self
            .packets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(packets) = packets {
            metrics::register(registry, packets, self.maps.pods_in_map.clone());
        }
    }

    fn held(&self) -> Result<Vec<u32>> {
        Ok(attach::all_pinned(&self.dirs)?
            .into_iter()
            .filter(|(_, _, p)| p.hook.is_hold())
            .map(|(_, _, p)| p.ifindex)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect())
    }

    fn apply(&mut self, state: &NodeState) -> Result<Report> {
        mkdirs(&self.dirs)?;
        let mut facts = facts::resolve(&self.nl, state)?;
        let mut report = Report::default();
        report.failed.append(&mut facts.failures);
        self.ztunnels.update(&self.nl, facts.ztunnel.as_ref());
        let routed = self
            .ztunnels
            .route(&mut self.ebpf, &self.dirs, facts.ztunnel.as_ref());
        match (routed, &facts.ztunnel) {
            (Err(e), Some(z)) => {
                report.failed.push((z.pod.clone(), e));
                facts.ztunnel = None;
            }
            (r, _) => r?,
        }
        report.draining = self
            .ztunnels
            .draining
            .as_ref()
            .map(|d| d.ztunnel.pod.clone());
        let draining = self.ztunnels.draining.as_ref().map(|d| maps::Draining {
            ztunnel: &d.ztunnel,
            netns_id: d.netns_id,
        });
        let desired = maps::desired(&facts, draining);
        let owned = self.attachments(&facts);
        // ztunnel's own programs before the maps send anything its way: a SYN redirected into
        // a netns without the tproxy program is lost, and retransmitted a second later.
        let ztunnel_side: Vec<Attachment> = owned
            .keys()
            .filter(|a| matches!(a.hook, Hook::ZtunnelReturn | Hook::ZtunnelTproxy))
            .cloned()
            .collect();
        let mut ensured = attach::ensure(
            &mut self.ebpf,
            &self.dirs,
            self.attach,
            &ztunnel_side,
            &mut self.adopted,
        )?;
        let ztunnel_veths: Vec<u32> = ztunnel_side
            .iter()
            .filter(|a| a.hook == Hook::ZtunnelReturn)
            .map(|a| a.ifindex)
            .collect();
        attach::release_holds(&self.dirs, &ztunnel_veths, &mut self.adopted)?;
        self.maps.upsert(&desired)?;
        let mut wanted: Vec<Attachment> = owned.keys().cloned().collect();
        wanted.extend(self.holds(&facts.held));
        let rest: Vec<Attachment> = wanted
            .iter()
            .filter(|a| !ztunnel_side.contains(a))
            .cloned()
            .collect();
        let more = attach::ensure(
            &mut self.ebpf,
            &self.dirs,
            self.attach,
            &rest,
            &mut self.adopted,
        )?;
        ensured.failures.extend(more.failures);
        ensured.moved_to_head.extend(more.moved_to_head);
        ensured.repaired.extend(more.repaired);
        for a in &ensured.repaired {
            log::warn!(
                "{} on {} ({}) was gone from the kernel: put back",
                a.hook.program(),
                a.ifname,
                a.hook.direction()
            );
        }
        report.repaired = ensured.repaired.len();
        for (a, ahead) in &ensured.moved_to_head {
            log::warn!(
                "{} on {} ({}): {ahead} had been attached in front of it; moved back to the head",
                a.hook.program(),
                a.ifname,
                a.hook.direction()
            );
        }
        report.moved_to_head = ensured.moved_to_head.len();
        let failures = ensured.failures;
        // A held veth whose capture could not be attached stays held: released by capture only.
        let capture_failed: BTreeSet<u32> = failures
            .iter()
            .filter(|(a, _)| !a.hook.is_hold())
            .map(|(a, _)| a.ifindex)
            .collect();
        let kept: Vec<&crate::nl::Link> = facts
            .pods
            .values()
            .map(|p| &p.veth)
            .filter(|v| state.held_links.contains(&v.index) && capture_failed.contains(&v.index))
            .collect();
        wanted.extend(self.holds(kept));
        report.held = wanted
            .iter()
            .filter(|a| a.hook.is_hold())
            .map(|a| a.ifindex)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        attach::remove_stale(&self.dirs, self.attach, &wanted, &mut self.adopted)?;
        self.maps.remove_stale(&desired)?;

        let mut failed_pods = BTreeSet::new();
        for (a, e) in failures {
            let pods = owned.get(&a).map_or(&[][..], Vec::as_slice);
            failed_pods.extend(pods.iter().cloned());
            if let Some((first, rest)) = pods.split_first() {
                for id in rest {
                    report.failed.push((id.clone(), a.error(e.to_string())));
                }
                report.failed.push((first.clone(), e));
            }
        }
        report.ztunnel = super::ZtunnelState::of(
            facts
                .ztunnel
                .as_ref()
                .filter(|z| !failed_pods.contains(&z.pod)),
        );
        report.captured = facts
            .pods
            .keys()
            .filter(|id| !failed_pods.contains(id))
            .cloned()
            .collect();
        Ok(report)
    }
}
