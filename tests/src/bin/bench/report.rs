//! The tables: every figure with its spread, the ratios between variants, and the targets.
use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::{Figure, find};

#[derive(Serialize)]
pub struct Ratio {
    pub name: String,
    pub value: f64,
}

#[derive(Serialize)]
pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: f64,
    pub met: bool,
}

#[derive(Serialize)]
pub struct Report {
    pub date: String,
    pub kernel: String,
    pub command: String,
    pub figures: Vec<Figure>,
    pub ratios: Vec<Ratio>,
    pub targets: Vec<Target>,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn median(figs: &[Figure], case: &str, metric: &str) -> f64 {
    find(figs, case, metric).map_or(f64::NAN, |f| f.median)
}

impl Report {
    pub fn new(figures: Vec<Figure>, command: &str) -> Report {
        let mut ratios = vec![];
        let mut targets = vec![];
        for side in ["same-node", "cross-node"] {
            let m = |variant: &str, metric: &str| {
                median(&figures, &format!("{side}/{variant}"), metric)
            };
            let metrics = [
                "rr_p50",
                "rr_p99",
                "conn_p99",
                "conn_per_s",
                "bulk_1",
                "bulk_4",
            ];
            for metric in metrics {
                for (num, den) in [("b-ebpf", "c-iptables"), ("b-ebpf", "a-direct")] {
                    ratios.push(Ratio {
                        name: format!("{side} {metric} {}/{}", &num[2..], &den[2..]),
                        value: m(num, metric) / m(den, metric),
                    });
                }
            }
            for metric in metrics {
                ratios.push(Ratio {
                    name: format!("{side} {metric} inpod-ebpf/inpod-iptables"),
                    value: m("d-inpod-ebpf", metric) / m("e-inpod-iptables", metric),
                });
            }
            let eb = |metric: &str| m("b-ebpf", metric) / m("c-iptables", metric);
            let inpod = |metric: &str| m("d-inpod-ebpf", metric) / m("e-inpod-iptables", metric);
            let mut target = |what: &str, wanted: &str, measured: f64, met: bool| {
                targets.push(Target {
                    what: format!("{side}: {what}"),
                    target: wanted.into(),
                    measured,
                    met,
                });
            };
            let conn = eb("conn_per_s");
            target("connections/s, eBPF/fallback", "≥ 1.25", conn, conn >= 1.25);
            let p99 = eb("conn_p99");
            target("connection p99, eBPF/fallback", "≤ 0.50", p99, p99 <= 0.5);
            let rr = eb("rr_p50");
            target("RR latency p50, eBPF/fallback", "≤ 0.90", rr, rr <= 0.9);
            for metric in ["bulk_1", "bulk_4"] {
                let t = eb(metric);
                target(
                    &format!("throughput {metric}, eBPF/fallback"),
                    "≥ 1.00",
                    t,
                    t >= 1.0,
                );
            }
            let conn = inpod("conn_per_s");
            target(
                "in-pod connections/s, eBPF/rules",
                "≥ 1.25",
                conn,
                conn >= 1.25,
            );
            let rr = inpod("rr_p50");
            target("in-pod RR latency p50, eBPF/rules", "≤ 0.90", rr, rr <= 0.9);
            for metric in ["bulk_1", "bulk_4"] {
                let t = inpod(metric);
                target(
                    &format!("in-pod throughput {metric}, eBPF/rules"),
                    "≥ 1.00",
                    t,
                    t >= 1.0,
                );
            }
        }
        for metric in ["rr_p50", "rr_p99", "conn_per_s", "bulk_1"] {
            let m = |v: &str| median(&figures, &format!("redirect-only/{v}"), metric);
            ratios.push(Ratio {
                name: format!("redirect-only {metric} inpod-ebpf/inpod-iptables"),
                value: m("d-inpod-ebpf") / m("e-inpod-iptables"),
            });
        }
        for metric in ["add_p50", "add_p99", "zdivert_cni_p50", "burst_per_pod"] {
            let m = |v: &str| median(&figures, &format!("cni/{v}"), metric);
            ratios.push(Ratio {
                name: format!("CNI {metric} inpod-ebpf/inpod-iptables"),
                value: m("inpod-ebpf") / m("inpod-iptables"),
            });
        }
        let one_pod = median(&figures, "in-pod/ebpf", "apply_one_pod")
            / median(&figures, "in-pod/iptables", "apply_one_pod");
        targets.push(Target {
            what: "in-pod apply of one new pod, eBPF/rules".into(),
            target: "≤ 0.50".into(),
            measured: one_pod,
            met: one_pod <= 0.5,
        });
        // Every program takes a SYN; for the tproxy programs, whose SYN path is their costliest,
        // the rows say so, and the two after them take a segment of a connection.
        let per_packet = ["zd_outbound", "zd_inbound", "zd_zt_return"]
            .map(|p| {
                (
                    format!("10000 pods/{p}"),
                    format!("{p} per packet at 10k pods"),
                )
            })
            .into_iter()
            .chain([
                (
                    "10000 pods/zd_zt_tproxy".into(),
                    "zd_zt_tproxy per SYN at 10k pods".into(),
                ),
                (
                    "in-pod/zd_pod_egress".into(),
                    "zd_pod_egress per packet (in-pod)".into(),
                ),
                (
                    "in-pod/zd_pod_ingress".into(),
                    "zd_pod_ingress per SYN (in-pod)".into(),
                ),
            ])
            .chain([
                (
                    "10000 pods/zd_zt_tproxy (established)".into(),
                    "zd_zt_tproxy per established segment at 10k pods".into(),
                ),
                (
                    "in-pod/zd_pod_ingress (established)".into(),
                    "zd_pod_ingress per established segment (in-pod)".into(),
                ),
            ]);
        for (case, what) in per_packet {
            let ns = median(&figures, &case, "ns_per_packet");
            targets.push(Target {
                what,
                target: "≤ 100 ns".into(),
                measured: ns,
                met: ns <= 100.0,
            });
        }
        for (case, what) in [
            (
                "10000 pods/ebpf",
                "10k pods applied from empty, eBPF maps (TCX)",
            ),
            (
                "10000 pods/ebpf-clsact",
                "10k pods applied from empty, eBPF maps (tc clsact)",
            ),
        ] {
            let ms = median(&figures, case, "apply_from_empty");
            targets.push(Target {
                what: what.into(),
                target: "≤ 50 ms".into(),
                measured: ms,
                met: ms <= 50.0,
            });
        }
        let fb = median(&figures, "10000 pods/iptables", "apply_from_empty");
        targets.push(Target {
            what: "10k pods applied from empty, fallback".into(),
            target: "≤ 2000 ms".into(),
            measured: fb,
            met: fb <= 2000.0,
        });
        let rss = median(&figures, "1000 pods/ebpf", "agent_rss");
        targets.push(Target {
            what: "agent RSS at 1k pods (eBPF mode)".into(),
            target: "≤ 30 MiB".into(),
            measured: rss,
            met: rss <= 30.0,
        });
        Report {
            date: sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            kernel: sh("uname", &["-r"]),
            command: command.into(),
            figures,
            ratios,
            targets,
        }
    }

    /// A table of one row per mode: `header`'s columns are `metrics`' medians for the cases
    /// `<prefix>/<mode>`.
    fn mode_rows(
        &self,
        s: &mut String,
        header: &str,
        (prefix, modes): (&str, &[&str]),
        metrics: &[&str],
        decimals: usize,
    ) {
        let rule = "|---".repeat(metrics.len() + 1);
        let _ = writeln!(s, "\n{header}\n{rule}|");
        for mode in modes {
            let case = format!("{prefix}/{mode}");
            let row: Vec<String> = (metrics.iter())
                .map(|m| format!("{:.*}", decimals, median(&self.figures, &case, m)))
                .collect();
            let _ = writeln!(s, "| {mode} | {} |", row.join(" | "));
        }
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Measured {} on kernel {} with `{}` (medians over rounds; spread is min–max).\n",
            self.date, self.kernel, self.command
        );
        let _ = writeln!(s, "| target | wanted | measured | |\n|---|---|---|---|");
        for t in &self.targets {
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} | {} |",
                t.what,
                t.target,
                t.measured,
                if t.met { "met" } else { "**missed**" }
            );
        }
        // The data path at a glance: one row per case, the medians.
        let metrics = [
            "rr_p50",
            "rr_p99",
            "conn_per_s",
            "conn_p99",
            "bulk_1",
            "bulk_4",
        ];
        let _ = writeln!(
            s,
            "\n| data path | RR p50 µs | RR p99 µs | conn/s (16 clients) | conn p99 ms | 1 stream Gbit/s | 4 streams Gbit/s |\n|---|---|---|---|---|---|---|"
        );
        let mut cases: Vec<&str> = self
            .figures
            .iter()
            .filter(|f| f.section == "datapath")
            .map(|f| f.case.as_str())
            .collect();
        cases.dedup();
        for case in cases {
            let row: Vec<String> = metrics
                .iter()
                .map(|m| format!("{:.1}", median(&self.figures, case, m)))
                .collect();
            let _ = writeln!(s, "| {case} | {} |", row.join(" | "));
        }
        // The ztunnel replacement window and in-pod rollouts, one row per mode.
        self.mode_rows(
            &mut s,
            "| ztunnel replacement | long-lived broken (of 8) | new failed | new stalled > 1 s | new total |",
            ("ztunnel-replacement", &["ebpf", "iptables"]),
            &["long_lived_broken", "new_failed", "new_stalled", "new_total"],
            0,
        );
        self.mode_rows(
            &mut s,
            "| in-pod ztunnel rollouts | failed per rollout | stalled > 1 s per rollout | old ztunnel's access-log lines after the new one's ack, per rollout | rollouts | connections |",
            ("ztunnel-rollout", &["inpod-ebpf", "inpod-iptables"]),
            &[
                "failed_per_rollout",
                "stalled_per_rollout",
                "old_logged_after_ack_per_rollout",
                "rollouts",
                "total",
            ],
            1,
        );
        let _ = writeln!(s, "\n| ratio | value |\n|---|---|");
        for r in &self.ratios {
            let _ = writeln!(s, "| {} | {:.3} |", r.name, r.value);
        }
        for section in [
            "datapath",
            "upgrade",
            "rollout",
            "cni",
            "per_packet",
            "control",
        ] {
            let _ = writeln!(
                s,
                "\n| {section} case | metric | median | spread | unit |\n|---|---|---|---|---|"
            );
            for f in self.figures.iter().filter(|f| f.section == section) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.2} | {:.2}–{:.2} | {} |",
                    f.case, f.metric, f.median, f.min, f.max, f.unit
                );
            }
        }
        s
    }
}
