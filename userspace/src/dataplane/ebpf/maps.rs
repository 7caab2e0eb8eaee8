//! The maps' contents: computed from node facts (pure), written by diff, and read back from the
//! pins for `zdivert status` and `/metrics` without loading any program.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use zdivert_common::{
    COUNTERS, DrainingZtunnel, IpKey, NODE_IP_FILTER_WORDS, NODE_IP_LOCAL, POD_COUNTERS, POD_F_V4,
    POD_F_V6, PodEntry, ZTUNNEL_F_PRESENT, ZTUNNEL_F_V4, ZTUNNEL_F_V6, ZtunnelEntry,
};

use crate::{
    error::{Error, Result},
    facts::{NodeFacts, ZtunnelFacts},
};

pub use zdivert_common::map::*;

pub fn key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey::from_v4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpKey::from_v4(v4.octets()),
            None => IpKey::from_v6(v6.octets()),
        },
    }
}

pub fn ip(key: &IpKey) -> IpAddr {
    match key.v4() {
        Some(v4) => IpAddr::from(v4),
        None => IpAddr::from(key.addr),
    }
}

/// What the maps must hold for these facts.
#[derive(Debug, PartialEq, Eq)]
pub struct Desired {
    pub pods: BTreeMap<IpKey, PodEntry>,
    pub node_ips: BTreeMap<IpKey, u32>,
    pub ztunnel: ZtunnelEntry,
    pub draining: DrainingZtunnel,
}

/// A replaced ztunnel and its netns as the node's netns numbers it.
pub struct Draining<'a> {
    pub ztunnel: &'a ZtunnelFacts,
    pub netns_id: u32,
}

pub fn desired(facts: &NodeFacts, draining: Option<Draining>) -> Desired {
    let mut pods = BTreeMap::new();
    for pod in facts.pods.values() {
        let flags = pod.ips.iter().fold(0, |f, ip| {
            f | if ip.is_ipv4() { POD_F_V4 } else { POD_F_V6 }
        });
        for &ip in &pod.ips {
            pods.insert(
                key(ip),
                PodEntry {
                    host_ifindex: pod.veth.index,
                    flags,
                    _reserved: [0; 2],
                    host_mac: pod.veth.mac,
                },
            );
        }
    }
    let node_ips = facts
        .node_ips
        .iter()
        .map(|&ip| (key(ip), NODE_IP_LOCAL))
        .collect();
    Desired {
        pods,
        node_ips,
        ztunnel: ztunnel_entry(facts.ztunnel.as_ref()),
        draining: DrainingZtunnel {
            ztunnel: ztunnel_entry(draining.as_ref().map(|d| d.ztunnel)),
            netns_id: draining.map_or(0, |d| d.netns_id),
        },
    }
}

/// The map entry for `z`; without one, an entry whose flags say "none".
fn ztunnel_entry(z: Option<&ZtunnelFacts>) -> ZtunnelEntry {
    let mut ztunnel = ZtunnelEntry {
        host_ifindex: 0,
        flags: 0,
        ipv4: [0; 4],
        mac: [0; 6],
        _reserved: [0; 2],
        ipv6: [0; 16],
    };
    if let Some(z) = z {
        ztunnel.host_ifindex = z.host_veth.index;
        ztunnel.mac = z.eth0.mac;
        ztunnel.flags = ZTUNNEL_F_PRESENT;
        for ip in &z.ips {
            match ip {
                IpAddr::V4(v4) => {
                    ztunnel.ipv4 = v4.octets();
                    ztunnel.flags |= ZTUNNEL_F_V4;
                }
                IpAddr::V6(v6) => {
                    ztunnel.ipv6 = v6.octets();
                    ztunnel.flags |= ZTUNNEL_F_V6;
                }
            }
        }
    }
    ztunnel
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { map, source }
}

/// One map, taken out of the loaded object (the programs keep their own references).
pub fn take<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
) -> Result<T> {
    let map = ebpf.take_map(name).ok_or(Error::MapMissing { map: name })?;
    T::try_from(map).map_err(map_err(name))
}

/// `NODE_IP_FILTER`'s words for these node addresses.
pub fn node_ip_filter<'a>(ips: impl IntoIterator<Item = &'a IpKey>) -> Vec<u64> {
    let mut words = vec![0u64; NODE_IP_FILTER_WORDS as usize];
    for ip in ips {
        let bit = ip.node_filter_bit();
        words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    words
}

/// Writes `config` (`CONFIG_*` bits) for the programs.
pub fn write_config(ebpf: &mut aya::Ebpf, config: u32) -> Result<()> {
    let mut settings: Array<MapData, u32> = take(ebpf, CONFIG)?;
    settings.set(0, config, 0).map_err(map_err(CONFIG))
}

/// The maps the agent writes, taken out of the loaded object (the programs keep their own
/// references). Writes only what differs: additions and changes first, removals last, so that at
/// no moment a desired pod lacks its entry (its programs would drop its traffic as forged).
pub struct Maps {
    pods: HashMap<MapData, IpKey, PodEntry>,
    node_ips: HashMap<MapData, IpKey, u32>,
    node_ip_filter: Array<MapData, u64>,
    /// `node_ip_filter`'s words as last written or read; `None`: read them again.
    filter: Option<Vec<u64>>,
    ztunnel: Array<MapData, ZtunnelEntry>,
    draining: Array<MapData, DrainingZtunnel>,
    /// How many pod addresses the pod map holds, for `/metrics`.
    pub pods_in_map: prometheus_client::metrics::gauge::Gauge,
    /// What the maps hold, as this process last wrote or read it: a diff needs no read-back.
    /// Re-read from the kernel every `REREAD` (or after a failed write), so that an entry
    /// changed behind the agent's back is put right at the next resync.
    known: Option<(Instant, Desired)>,
}

const REREAD: Duration = Duration::from_secs(30);

impl Maps {
    /// Takes the maps the agent writes, and writes `config` (`CONFIG_*` bits) for the programs.
    pub fn take(ebpf: &mut aya::Ebpf, config: u32) -> Result<Self> {
        write_config(ebpf, config)?;
        Ok(Maps {
            pods: take(ebpf, PODS)?,
            node_ips: take(ebpf, NODE_IPS)?,
            node_ip_filter: take(ebpf, NODE_IP_FILTER)?,
            filter: None,
            ztunnel: take(ebpf, ZTUNNEL)?,
            draining: take(ebpf, ZTUNNEL_DRAINING)?,
            pods_in_map: Default::default(),
            known: None,
        })
    }

    /// The per-CPU counters, for `/metrics`.
    pub fn take_stats(ebpf: &mut aya::Ebpf) -> Result<PerCpuArray<MapData, u64>> {
        take(ebpf, PACKET_STATS)
    }

    /// The draining ztunnel an earlier agent left, if any.
    pub fn draining(&self) -> Result<DrainingZtunnel> {
        self.draining.get(&0, 0).map_err(map_err(ZTUNNEL_DRAINING))
    }

    /// The maps' contents, taken: remembered, or read from the kernel when too old. Put back
    /// only after every write succeeded, so a failed write makes the next apply read again.
    fn take_known(&mut self) -> Result<(Instant, Desired)> {
        match self.known.take() {
            Some(known) if known.0.elapsed() < REREAD => Ok(known),
            _ => {
                self.filter = None;
                self.read_known()
            }
        }
    }

    fn read_known(&self) -> Result<(Instant, Desired)> {
        let desired = Desired {
            pods: self
                .pods
                .iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(PODS))?,
            node_ips: self
                .node_ips
                .iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(NODE_IPS))?,
            ztunnel: self.ztunnel.get(&0, 0).map_err(map_err(ZTUNNEL))?,
            draining: self
                .draining
                .get(&0, 0)
                .map_err(map_err(ZTUNNEL_DRAINING))?,
        };
        Ok((Instant::now(), desired))
    }

    /// Writes the filter's words that differ from what `ips`, the addresses `NODE_IPS` holds
    /// now, need. Called after the map's additions and again after its removals, it clears only
    /// bits no address in the map needs, so the filter never hides one.
    fn write_filter(&mut self, ips: &BTreeMap<IpKey, u32>) -> Result<()> {
        let had = match self.filter.take() {
            Some(words) => words,
            None => (0..NODE_IP_FILTER_WORDS)
                .map(|i| self.node_ip_filter.get(&i, 0))
                .collect::<Result<_, _>>()
                .map_err(map_err(NODE_IP_FILTER))?,
        };
        let wanted = node_ip_filter(ips.keys());
        for (i, (w, h)) in (0..).zip(wanted.iter().zip(&had)) {
            if w != h {
                self.node_ip_filter
                    .set(i, w, 0)
                    .map_err(map_err(NODE_IP_FILTER))?;
            }
        }
        self.filter = Some(wanted);
        Ok(())
    }

    pub fn upsert(&mut self, d: &Desired) -> Result<()> {
        let (at, mut known) = self.take_known()?;
        // The replaced ztunnel first: its connections must never go to the new one meanwhile.
        if known.draining != d.draining {
            self.draining
                .set(0, d.draining, 0)
                .map_err(map_err(ZTUNNEL_DRAINING))?;
            known.draining = d.draining;
        }
        if known.ztunnel != d.ztunnel {
            self.ztunnel
                .set(0, d.ztunnel, 0)
                .map_err(map_err(ZTUNNEL))?;
            known.ztunnel = d.ztunnel;
        }
        for (k, v) in &d.node_ips {
            if known.node_ips.get(k) != Some(v) {
                self.node_ips.insert(k, v, 0).map_err(map_err(NODE_IPS))?;
                known.node_ips.insert(*k, *v);
            }
        }
        self.write_filter(&known.node_ips)?;
        for (k, v) in &d.pods {
            if known.pods.get(k) != Some(v) {
                self.pods.insert(k, v, 0).map_err(map_err(PODS))?;
                known.pods.insert(*k, *v);
            }
        }
        self.pods_in_map.set(known.pods.len() as i64);
        self.known = Some((at, known));
        Ok(())
    }

    pub fn remove_stale(&mut self, d: &Desired) -> Result<()> {
        let (at, mut known) = self.take_known()?;
        // An entry already absent is what was wanted.
        let absent = |r: std::result::Result<(), MapError>| match r {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            r => r,
        };
        let stale: Vec<IpKey> = known
            .pods
            .keys()
            .filter(|k| !d.pods.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            absent(self.pods.remove(&k)).map_err(map_err(PODS))?;
            known.pods.remove(&k);
        }
        let stale: Vec<IpKey> = known
            .node_ips
            .keys()
            .filter(|k| !d.node_ips.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            absent(self.node_ips.remove(&k)).map_err(map_err(NODE_IPS))?;
            known.node_ips.remove(&k);
        }
        self.write_filter(&known.node_ips)?;
        self.pods_in_map.set(known.pods.len() as i64);
        self.known = Some((at, known));
        Ok(())
    }
}

/// The maps as pinned, decoded.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub pods: BTreeMap<IpAddr, PodEntry>,
    pub node_ips: Vec<IpAddr>,
    pub ztunnel: Option<ZtunnelEntry>,
    /// `(path, outcome, packets)` summed over CPUs.
    pub counters: Vec<(&'static str, &'static str, u64)>,
}

pub(super) fn open(dir: &Path, name: &'static str) -> Result<Map> {
    let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

pub fn snapshot(dir: &Path) -> Result<Snapshot> {
    let pods: HashMap<_, IpKey, PodEntry> = open(dir, PODS)?.try_into().map_err(map_err(PODS))?;
    let node_ips: HashMap<_, IpKey, u32> =
        open(dir, NODE_IPS)?.try_into().map_err(map_err(NODE_IPS))?;
    let ztunnel: Array<_, ZtunnelEntry> =
        open(dir, ZTUNNEL)?.try_into().map_err(map_err(ZTUNNEL))?;
    let z = ztunnel.get(&0, 0).map_err(map_err(ZTUNNEL))?;
    let mut counters = Vec::new();
    // Absent from the pins of an agent older than the one counter map: no counters then.
    if dir.join(PACKET_STATS).exists() {
        let stats: PerCpuArray<_, u64> = open(dir, PACKET_STATS)?
            .try_into()
            .map_err(map_err(PACKET_STATS))?;
        for &(slot, path, outcome) in COUNTERS.iter().chain(POD_COUNTERS) {
            let per_cpu = stats.get(&slot, 0).map_err(map_err(PACKET_STATS))?;
            counters.push((path, outcome, per_cpu.iter().sum()));
        }
    }
    Ok(Snapshot {
        pods: pods.iter().flatten().map(|(k, v)| (ip(&k), v)).collect(),
        node_ips: node_ips.keys().flatten().map(|k| ip(&k)).collect(),
        ztunnel: (z.flags & ZTUNNEL_F_PRESENT != 0).then_some(z),
        counters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{facts::PodFacts, nl::Link, state::PodId};

    #[test]
    fn keys_hold_both_families_and_round_trip() {
        for s in ["10.244.2.3", "fd00:10:244:2::3", "::1"] {
            let a: IpAddr = s.parse().unwrap();
            assert_eq!(ip(&key(a)), a, "{s}");
        }
        let mapped: IpAddr = "::ffff:10.244.2.3".parse().unwrap();
        assert_eq!(key(mapped), key("10.244.2.3".parse().unwrap()));
    }

    #[test]
    fn the_node_ip_filter_has_a_bit_for_each_node_address_and_no_other() {
        let node: Vec<IpKey> = ["10.244.2.1", "172.18.0.3", "fd00:172:18::3"]
            .iter()
            .map(|s| key(s.parse().unwrap()))
            .collect();
        let words = node_ip_filter(&node);
        assert_eq!(words.len(), NODE_IP_FILTER_WORDS as usize);
        let is_set = |ip: &IpKey| {
            let bit = ip.node_filter_bit();
            words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        };
        assert!(node.iter().all(is_set));
        let bits: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(bits, 3, "three addresses, three distinct bits");
        // The pod addresses beside the node's gateway address fold elsewhere.
        for pod in ["10.244.2.3", "10.244.2.7", "fd00:10:244:2::3"] {
            assert!(!is_set(&key(pod.parse().unwrap())), "{pod}");
        }
    }

    #[test]
    fn desired_maps_every_address_of_a_pod_to_its_veth() {
        let veth = Link {
            name: "vethA".into(),
            index: 7,
            mac: [2, 0, 0, 0, 0, 7],
            is_veth: true,
            peer_netns_id: None,
            peer_index: None,
        };
        let mut facts = NodeFacts::default();
        facts.pods.insert(
            PodId {
                namespace: "default".into(),
                name: "reviews-v1".into(),
            },
            PodFacts {
                ips: vec![
                    "10.244.2.7".parse().unwrap(),
                    "fd00:10:244:2::7".parse().unwrap(),
                ],
                veth,
            },
        );
        let d = desired(&facts, None);
        assert_eq!(d.pods.len(), 2);
        for e in d.pods.values() {
            assert_eq!(e.host_ifindex, 7);
            assert_eq!(e.flags, POD_F_V4 | POD_F_V6);
            assert_eq!(e.host_mac, [2, 0, 0, 0, 0, 7]);
        }
        // No ztunnel: the slot says so, and the programs fail closed.
        assert_eq!(d.ztunnel.flags & ZTUNNEL_F_PRESENT, 0);
    }
}
