//! Whether ztunnel is there to take what is captured: its listeners, read from its netns. A
//! ztunnel pod whose process has not started listening yet, or has exited, keeps its netns (and
//! so its place in the maps); the dataplanes keep failing closed meanwhile, and this is how the
//! agent and `zdivert status` can say so by name.
use std::{collections::BTreeSet, path::Path};

use zdivert_common::{PORT_INBOUND_HBONE, PORT_INBOUND_PLAIN, PORT_OUTBOUND};

use crate::{error::Result, netns};

/// The listeners captured traffic is handed to.
pub const LISTENERS: [u16; 3] = [PORT_OUTBOUND, PORT_INBOUND_PLAIN, PORT_INBOUND_HBONE];

/// The TCP ports something listens on in the netns at `ns`.
pub fn listening(ns: &Path) -> Result<BTreeSet<u16>> {
    netns::run_in(ns, || {
        let mut ports = BTreeSet::new();
        // /proc/thread-self/net follows the calling thread's netns, which run_in switched.
        for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            ports.extend(listening_ports(&text));
        }
        ports
    })
}

/// The local ports of the LISTEN (state 0A) rows of a `/proc/net/tcp{,6}` table.
fn listening_ports(table: &str) -> impl Iterator<Item = u16> + '_ {
    table.lines().skip(1).filter_map(|row| {
        let cols: Vec<&str> = row.split_whitespace().collect();
        let (local, state) = (cols.get(1)?, cols.get(3)?);
        let port = local.rsplit_once(':')?.1;
        (*state == "0A").then(|| u16::from_str_radix(port, 16).ok())?
    })
}

/// The listeners of `LISTENERS` that are missing from `ports`.
pub fn missing(ports: &BTreeSet<u16>) -> Vec<u16> {
    LISTENERS
        .into_iter()
        .filter(|p| !ports.contains(p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listening_ports_and_ignores_other_states() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
           0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0\n\
           1: 0A00000A:3A99 0300F40A:9C40 01 00000000:00000000 00:00000000 00000000 0\n\
           2: 00000000000000000000000000000000:3A9E 00000000000000000000000000000000:0000 0A x\n";
        let ports: BTreeSet<u16> = listening_ports(table).collect();
        assert_eq!(ports, BTreeSet::from([15001, 15006]));
        assert_eq!(missing(&ports), vec![15008]);
    }
}
