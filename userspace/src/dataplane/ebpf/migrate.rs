//! A node moves from the pin layout an agent of the previous version left
//! (`PIN_VERSION_BEFORE`) to this one without a moment uncaptured. The old programs keep running
//! on the old maps until this agent swaps its own programs into their links (the ordinary
//! restart path, `attach`), so the new maps must already hold what the old ones held:
//! 1. the entries the agent writes are copied across, translated to this version's layout;
//! 2. the attachments' pins (TCX links, clsact records, sk_lookup links) are renamed into this
//!    layout's directories, where `apply` finds and adopts them;
//! 3. the old map pins go (the old programs hold their maps until they are swapped out).
use std::path::Path;

use aya::maps::{Array, HashMap, Map};
use zdivert_common::{
    DnsFlow, DnsFlowKey, DrainingZtunnel, IpKey, PIN_VERSION_BEFORE, PodEntry, ZtunnelEntry,
    dns_slot, map,
};

use super::PinDirs;
use crate::error::{Error, Result};

/// `PodEntry` as version v2 laid it out: a `pod_mac` nothing read.
#[repr(C)]
#[derive(Clone, Copy)]
struct PodEntryV2 {
    host_ifindex: u32,
    flags: u32,
    _pod_mac: [u8; 6],
    host_mac: [u8; 6],
}
// SAFETY: plain-old-data without padding (4 + 4 + 6 + 6 = 20 bytes, align 4).
unsafe impl aya::Pod for PodEntryV2 {}
const _: () = assert!(size_of::<PodEntryV2>() == 20);

impl From<PodEntryV2> for PodEntry {
    fn from(old: PodEntryV2) -> Self {
        PodEntry {
            host_ifindex: old.host_ifindex,
            flags: old.flags,
            host_mac: old.host_mac,
            _reserved: [0; 2],
        }
    }
}

/// v2's `DNS_FLOWS` key: a pod's flow by its port; the value was the server.
#[repr(C)]
#[derive(Clone, Copy)]
struct DnsFlowKeyV2 {
    pod: [u8; 4],
    port_be: u16,
    proto: u8,
    _reserved: u8,
}
// SAFETY: plain-old-data without padding (4 + 2 + 1 + 1 = 8 bytes, align 2).
unsafe impl aya::Pod for DnsFlowKeyV2 {}
const DNS_FLOWS_V2: &str = map::RETIRED[0];

/// What a migration carried over.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    pub map_entries: usize,
    pub pins: usize,
}

/// Moves `node`'s state from the previous layout into `to`, if an earlier agent left one.
pub fn from_previous(bpffs: &Path, node: &str, to: &PinDirs) -> Result<Option<Migrated>> {
    let from = PinDirs::of_version(bpffs, PIN_VERSION_BEFORE, node);
    if !from.root.exists() {
        return Ok(None);
    }
    let mut migrated = Migrated {
        map_entries: copy_maps(&from, to)?,
        pins: 0,
    };
    for (old_dir, new_dir) in [(&from.links, &to.links), (&from.filters, &to.filters)] {
        for entry in read_dir(old_dir)? {
            let (old, new) = (entry.path(), new_dir.join(entry.file_name()));
            if new.exists() {
                // An interrupted migration: this layout's attachment is already in place.
                remove(&old)?;
            } else {
                std::fs::rename(&old, &new).map_err(|source| Error::Bpffs { path: old, source })?;
                migrated.pins += 1;
            }
        }
    }
    for d in [&from.links, &from.filters, &from.maps] {
        for entry in read_dir(d)? {
            remove(&entry.path())?;
        }
    }
    for d in [&from.links, &from.filters, &from.maps, &from.root] {
        std::fs::remove_dir(d).map_err(|source| Error::Bpffs {
            path: d.clone(),
            source,
        })?;
    }
    // The version's directory, if no other node's state is in it.
    if let Some(version_dir) = from.root.parent() {
        let _ = std::fs::remove_dir(version_dir);
    }
    log::info!(
        "migrated node {node} from pin layout {PIN_VERSION_BEFORE}: {} map entries, {} \
         attachment pins",
        migrated.map_entries,
        migrated.pins
    );
    Ok(Some(migrated))
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries.flatten().collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(Error::Bpffs {
            path: dir.into(),
            source,
        }),
    }
}

fn remove(path: &Path) -> Result<()> {
    std::fs::remove_file(path).map_err(|source| Error::Bpffs {
        path: path.into(),
        source,
    })
}

fn open(dirs: &PinDirs, name: &'static str) -> Result<Option<Map>> {
    if !dirs.maps.join(name).exists() {
        return Ok(None);
    }
    super::maps::open(&dirs.maps, name).map(Some)
}

/// Copies the maps whose entries the programs need from the first packet on: pods, node
/// addresses, ztunnels, and the DNS flows in flight. The packet counters start again from zero, and
/// `LISTENERS` is refilled by the programs themselves.
fn copy_maps(from: &PinDirs, to: &PinDirs) -> Result<usize> {
    let err = |map| move |source| Error::Map { map, source };
    let mut copied = 0;
    if let (Some(old), Some(new)) = (open(from, map::PODS)?, open(to, map::PODS)?) {
        let old: HashMap<_, IpKey, PodEntryV2> = HashMap::try_from(old).map_err(err(map::PODS))?;
        let mut new: HashMap<_, IpKey, PodEntry> =
            HashMap::try_from(new).map_err(err(map::PODS))?;
        for entry in old.iter() {
            let (ip, pod) = entry.map_err(err(map::PODS))?;
            new.insert(ip, PodEntry::from(pod), 0)
                .map_err(err(map::PODS))?;
            copied += 1;
        }
    }
    copied += copy_hash::<IpKey, u32>(from, to, map::NODE_IPS)?;
    copied += copy_dns_flows(from, to)?;
    copied += copy_slot::<ZtunnelEntry>(from, to, map::ZTUNNEL)?;
    copied += copy_slot::<DrainingZtunnel>(from, to, map::ZTUNNEL_DRAINING)?;
    Ok(copied)
}

fn copy_hash<K: aya::Pod, V: aya::Pod>(
    from: &PinDirs,
    to: &PinDirs,
    name: &'static str,
) -> Result<usize> {
    let err = move |source| Error::Map { map: name, source };
    let (Some(old), Some(new)) = (open(from, name)?, open(to, name)?) else {
        return Ok(0);
    };
    let old: HashMap<_, K, V> = HashMap::try_from(old).map_err(err)?;
    let mut new: HashMap<_, K, V> = HashMap::try_from(new).map_err(err)?;
    let mut copied = 0;
    for entry in old.iter() {
        let (k, v) = entry.map_err(err)?;
        new.insert(k, v, 0).map_err(err)?;
        copied += 1;
    }
    Ok(copied)
}

/// v2's DNS flows, each into the slot of its port.
fn copy_dns_flows(from: &PinDirs, to: &PinDirs) -> Result<usize> {
    let err = |map| move |source| Error::Map { map, source };
    let (Some(old), Some(new)) = (open(from, DNS_FLOWS_V2)?, open(to, map::DNS_FLOW_SLOTS)?) else {
        return Ok(0);
    };
    let old: HashMap<_, DnsFlowKeyV2, [u8; 4]> =
        HashMap::try_from(old).map_err(err(DNS_FLOWS_V2))?;
    let mut new: HashMap<_, DnsFlowKey, DnsFlow> =
        HashMap::try_from(new).map_err(err(map::DNS_FLOW_SLOTS))?;
    let mut copied = 0;
    for entry in old.iter() {
        let (k, server) = entry.map_err(err(DNS_FLOWS_V2))?;
        let key = DnsFlowKey {
            pod: k.pod,
            slot: dns_slot(k.port_be),
            proto: k.proto,
            _reserved: 0,
        };
        let flow = DnsFlow {
            server,
            port_be: k.port_be,
            _reserved: 0,
        };
        new.insert(key, flow, 0).map_err(err(map::DNS_FLOW_SLOTS))?;
        copied += 1;
    }
    Ok(copied)
}

fn copy_slot<V: aya::Pod>(from: &PinDirs, to: &PinDirs, name: &'static str) -> Result<usize> {
    let err = move |source| Error::Map { map: name, source };
    let (Some(old), Some(new)) = (open(from, name)?, open(to, name)?) else {
        return Ok(0);
    };
    let old: Array<_, V> = Array::try_from(old).map_err(err)?;
    let mut new: Array<_, V> = Array::try_from(new).map_err(err)?;
    new.set(0, old.get(&0, 0).map_err(err)?, 0).map_err(err)?;
    Ok(1)
}
