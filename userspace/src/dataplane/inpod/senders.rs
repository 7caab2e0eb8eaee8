//! `INPOD_SENDERS`: each redirected pod's addresses, to its eth0's MAC. In-pod DNS capture
//! notes a flow under a query's source address only when that address's pod sent it, so a pod
//! that claims another's address cannot take that pod's DNS flow slots (`zdivert_common::PodMac`).
use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{HashMap, MapData};
use zdivert_common::{IpKey, PodMac};

use crate::{
    dataplane::ebpf::maps::{self, INPOD_SENDERS},
    error::{Error, Result},
};

pub struct Senders {
    map: HashMap<MapData, IpKey, PodMac>,
    /// Each redirected pod netns's entries, by inode.
    by_netns: BTreeMap<u64, Vec<IpKey>>,
}

impl Senders {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Senders> {
        Ok(Senders {
            map: maps::take(ebpf, INPOD_SENDERS)?,
            by_netns: BTreeMap::new(),
        })
    }

    /// The pod in netns `inode` holds `ips`, behind an eth0 with address `mac`.
    pub fn set(&mut self, inode: u64, ips: &[IpAddr], mac: [u8; 6]) -> Result<()> {
        let keys: Vec<IpKey> = ips.iter().map(|ip| maps::key(*ip)).collect();
        let value = PodMac {
            mac,
            _reserved: [0; 2],
        };
        for key in &keys {
            self.map.insert(key, value, 0).map_err(map_err)?;
        }
        self.by_netns.insert(inode, keys);
        Ok(())
    }

    /// Removes every entry but those of the pod netns in `keep`: pods released, and pods an
    /// earlier agent redirected that are gone. An address another pod has taken since stays.
    pub fn keep_only(&mut self, keep: &[u64]) -> Result<()> {
        self.by_netns.retain(|inode, _| keep.contains(inode));
        let wanted: Vec<IpKey> = self.by_netns.values().flatten().copied().collect();
        let stale: Vec<IpKey> = (self.map.keys())
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            self.map.remove(&key).map_err(map_err)?;
        }
        Ok(())
    }
}

fn map_err(source: aya::maps::MapError) -> Error {
    Error::Map {
        map: INPOD_SENDERS,
        source,
    }
}
