//! The eBPF dataplane: TC programs on the pods' and ztunnel's veths, maps and links pinned under
//! `<bpffs>/zdivert/<PIN_VERSION>/<node>/{maps,links,filters}`.
pub mod attach;
mod lookup;
pub mod maps;
mod probe;

pub use probe::probe;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{Ebpf, EbpfLoader, programs::SchedClassifier};
use zdivert_common::{
    MARK_MASK, MARK_TPROXY, PIN_VERSION, ZTUNNEL_TPROXY_RULE_PRIORITY, ZTUNNEL_TPROXY_TABLE,
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
        let root = bpffs.join("zdivert").join(PIN_VERSION).join(node);
        PinDirs {
            maps: root.join("maps"),
            links: root.join("links"),
            filters: root.join("filters"),
            root,
        }
    }
}

pub struct EbpfDataplane {
    ebpf: Ebpf,
    maps: maps::Maps,
    dirs: PinDirs,
    attach: AttachMode,
    nl: Netlink,
    node_netns_inode: u64,
    /// Attachment pins this process has already swapped its programs into.
    adopted: BTreeSet<String>,
    /// ztunnel netns (path, has IPv6) whose tproxy routing and lookup link this process set up.
    routed_ztunnel: Option<(PathBuf, bool)>,
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn ensure_bpffs(bpffs: &Path) -> Result<()> {
    let c =
        std::ffi::CString::new(bpffs.as_os_str().as_encoded_bytes()).map_err(|e| Error::Bpffs {
            path: bpffs.into(),
            reason: e.to_string(),
        })?;
    // SAFETY: statfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        let reason = std::io::Error::last_os_error().to_string();
        return Err(Error::Bpffs {
            path: bpffs.into(),
            reason,
        });
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        let reason = "not a bpffs mount (mount -t bpf bpf /sys/fs/bpf)".into();
        return Err(Error::Bpffs {
            path: bpffs.into(),
            reason,
        });
    }
    Ok(())
}

fn mkdirs(dirs: &PinDirs) -> Result<()> {
    for d in [&dirs.maps, &dirs.links, &dirs.filters] {
        std::fs::create_dir_all(d).map_err(|e| Error::Bpffs {
            path: d.clone(),
            reason: e.to_string(),
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
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dirs.maps)
            .load(OBJECT)?;
        for program in Hook::PROGRAMS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(program)
                .ok_or(Error::Map {
                    map: "programs",
                    reason: format!("{program} missing from the object"),
                })?
                .try_into()
                .map_err(|source| Error::Program { program, source })?;
            prog.load()
                .map_err(|source| Error::Program { program, source })?;
        }
        lookup::program(&mut ebpf)?
            .load()
            .map_err(|source| Error::Program {
                program: lookup::PROGRAM,
                source,
            })?;
        let config = if dns_capture {
            zdivert_common::CONFIG_DNS_CAPTURE
        } else {
            0
        };
        let maps = maps::Maps::take(&mut ebpf, config)?;
        Ok(EbpfDataplane {
            ebpf,
            maps,
            dirs,
            attach,
            nl: Netlink::new()?,
            node_netns_inode: netns::inode(Path::new("/proc/self/ns/net"))?,
            adopted: BTreeSet::new(),
            routed_ztunnel: None,
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
        if let Some(z) = &facts.ztunnel {
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

    /// In ztunnel's netns: `ip rule 20000 fwmark 0x400/0xfff lookup 100`, `local default dev lo
    /// table 100` and the sk_lookup link; their removal from a previous ztunnel's netns.
    fn route_ztunnel(&mut self, facts: &NodeFacts) -> Result<()> {
        let want = facts.ztunnel.as_ref().map(|z| {
            (
                z.netns.clone(),
                z.ips.iter().any(IpAddr::is_ipv6),
                z.netns_inode,
            )
        });
        let done = self.routed_ztunnel.take();
        if let Some((old, v6)) = &done
            && Some(old) != want.as_ref().map(|w| &w.0)
            && old.exists()
            && let Err(e) = unroute_ztunnel(old, *v6)
        {
            log::warn!(
                "removing tproxy routing from old ztunnel netns {}: {e}",
                old.display()
            );
        }
        lookup::remove_others(&self.dirs, want.as_ref().map(|w| w.2))?;
        if let Some((ns, v6, inode)) = want {
            tproxy_routing(&ns, v6, true)?;
            let pinned = self.dirs.links.join(lookup::pin_name(inode)).exists();
            if done.as_ref().is_none_or(|d| d.0 != ns) || !pinned {
                lookup::attach(&mut self.ebpf, &self.dirs, &ns, inode)?;
            }
            self.routed_ztunnel = Some((ns, v6));
        }
        Ok(())
    }
}

fn unroute_ztunnel(ns: &Path, v6: bool) -> Result<()> {
    tproxy_routing(ns, v6, false)
}

/// Installs (or removes) the rule and local route that deliver assigned packets, in ztunnel's
/// netns, for IPv4 and, if ztunnel has an IPv6 address, IPv6.
fn tproxy_routing(ns: &Path, v6: bool, install: bool) -> Result<()> {
    netns::run_in(ns, || -> Result<()> {
        let nl = Netlink::new()?;
        for family_v6 in [false, true].into_iter().filter(|f| v6 || !f) {
            if install {
                nl.ensure_rule(TPROXY_RULE, family_v6)?;
                nl.ensure_local_default(ZTUNNEL_TPROXY_TABLE, family_v6)?;
            } else {
                nl.remove_rule(TPROXY_RULE, family_v6)?;
                nl.remove_local_default(ZTUNNEL_TPROXY_TABLE, family_v6)?;
            }
        }
        Ok(())
    })?
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn hold(&mut self, links: &[crate::nl::Link]) -> Result<()> {
        mkdirs(&self.dirs)?;
        let holds = self.holds(links);
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
        if let Some(z) = &facts.ztunnel {
            if let Err(e) = self.route_ztunnel(&facts) {
                report.failed.push((z.pod.clone(), e));
                facts.ztunnel = None;
            }
        } else {
            self.route_ztunnel(&facts)?;
        }

        let desired = maps::desired(&facts);
        self.maps.upsert(&desired)?;
        let owned = self.attachments(&facts);
        let mut wanted: Vec<Attachment> = owned.keys().cloned().collect();
        let holds = self.holds(&facts.held);
        wanted.extend(holds.iter().cloned());
        let ensured = attach::ensure(
            &mut self.ebpf,
            &self.dirs,
            self.attach,
            &wanted,
            &mut self.adopted,
        )?;
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

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub links: usize,
    pub maps: usize,
    pub ztunnel_netns: Vec<PathBuf>,
}

/// Removes every link, pin and ztunnel-netns rule of this node's eBPF dataplane, working from the
/// pins alone (no agent needs to run). Links go first, so no program is left without its maps.
pub fn cleanup(bpffs: &Path, node: &str) -> Result<Cleaned> {
    let dirs = PinDirs::new(bpffs, node);
    let mut cleaned = Cleaned::default();
    for (name, mode, pinned) in attach::all_pinned(&dirs)? {
        if pinned.hook == Hook::ZtunnelTproxy
            && let Some(ns) = netns::find_by_inode(pinned.netns_inode)
        {
            // Both families: removing an absent rule is not an error.
            match unroute_ztunnel(&ns, true).or_else(|_| unroute_ztunnel(&ns, false)) {
                Ok(()) => cleaned.ztunnel_netns.push(ns),
                Err(e) => log::warn!("ztunnel netns {}: {e}", ns.display()),
            }
        }
        attach::detach(&dirs, mode, &name, &pinned)?;
        cleaned.links += 1;
    }
    cleaned.links += lookup::remove_others(&dirs, None)?;
    for name in maps::ALL {
        let path = dirs.maps.join(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| Error::Bpffs {
                path,
                reason: e.to_string(),
            })?;
            cleaned.maps += 1;
        }
    }
    // A re-record or re-pin an agent did not finish (see attach::clsact, lookup).
    let dirs_with_repins = [&dirs.filters, &dirs.links];
    for e in dirs_with_repins
        .into_iter()
        .flat_map(std::fs::read_dir)
        .flatten()
        .flatten()
    {
        if e.file_name()
            .to_string_lossy()
            .starts_with(attach::REPIN_PREFIX)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
    // Remove our directories bottom-up, stopping at the first that holds something else.
    for d in [&dirs.links, &dirs.filters, &dirs.maps, &dirs.root] {
        let _ = std::fs::remove_dir(d);
    }
    let mut up = dirs.root.parent();
    while let Some(d) = up.filter(|d| d.starts_with(bpffs.join("zdivert"))) {
        if std::fs::remove_dir(d).is_err() {
            break;
        }
        up = d.parent();
    }
    Ok(cleaned)
}
