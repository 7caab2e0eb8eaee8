//! The eBPF dataplane's metrics: the programs' per-path packet counters, read from the per-CPU
//! `PACKET_STATS` map this process already holds open (its mode's slots), and the pod map's
//! size as the agent last wrote it. A scrape costs one lookup per counter and never walks the
//! pod map.
use aya::maps::{MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::Gauge},
    registry::Registry,
};
pub struct PacketCounters {
    stats: PerCpuArray<MapData, u64>,
    /// `zdivert_common::COUNTERS` or `POD_COUNTERS`: what each slot of `stats` counts.
    counters: &'static [(u32, &'static str, &'static str)],
}

impl std::fmt::Debug for PacketCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PacketCounters({} counters)", self.counters.len())
    }
}

impl PacketCounters {
    pub fn new(
        stats: PerCpuArray<MapData, u64>,
        counters: &'static [(u32, &'static str, &'static str)],
    ) -> Self {
        PacketCounters { stats, counters }
    }
}

impl Collector for PacketCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "packets",
            "Packets seen by the eBPF programs, by path and verdict (summed over CPUs)",
            None,
            MetricType::Counter,
        )?;
        for &(index, path, outcome) in self.counters {
            // A counter the kernel cannot read now is left out of this scrape, not made up.
            let Ok(per_cpu) = self.stats.get(&index, 0) else {
                continue;
            };
            let total: u64 = per_cpu.iter().sum();
            let labels = [("path", path), ("outcome", outcome)];
            ConstCounter::new(total).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

pub fn register(registry: &mut Registry, packets: PacketCounters, pods_in_map: Gauge) {
    registry.register(
        "pods_in_map",
        "Pod addresses in the pod map, as the agent last wrote it",
        pods_in_map,
    );
    registry.register_collector(Box::new(packets));
}
