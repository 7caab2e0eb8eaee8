//! One HTTP listener for the kubelet's probes and Prometheus: `/healthz` (the reconcile loop is
//! alive), `/readyz` (the first sync reached the kernel) and `/metrics` (text format: what the
//! agent did, and in eBPF mode the programs' per-path packet counters from the per-CPU map).
use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::dataplane::Report;

/// A reconcile loop that has not come round for this long is stuck: liveness fails.
const STUCK: Duration = Duration::from_secs(120);

pub struct Health {
    pub node: String,
    pub mode: &'static str,
    /// Where the eBPF pins are (counters are read from there on every scrape).
    pub bpffs: PathBuf,
    started: Instant,
    ready: AtomicBool,
    ztunnel_ready: AtomicBool,
    ztunnel_draining: AtomicBool,
    applies: AtomicU64,
    apply_errors: AtomicU64,
    pod_failures: AtomicU64,
    moved_to_head: AtomicU64,
    captured: AtomicU64,
    held: AtomicU64,
    source_errors: AtomicU64,
    last_success: Mutex<Option<Instant>>,
    heartbeat: Mutex<Instant>,
}

impl Health {
    pub fn new(node: &str, mode: &'static str, bpffs: PathBuf) -> Self {
        Health {
            node: node.into(),
            mode,
            bpffs,
            started: Instant::now(),
            ready: AtomicBool::new(false),
            ztunnel_ready: AtomicBool::new(false),
            ztunnel_draining: AtomicBool::new(false),
            applies: AtomicU64::new(0),
            apply_errors: AtomicU64::new(0),
            pod_failures: AtomicU64::new(0),
            moved_to_head: AtomicU64::new(0),
            captured: AtomicU64::new(0),
            held: AtomicU64::new(0),
            source_errors: AtomicU64::new(0),
            last_success: Mutex::new(None),
            heartbeat: Mutex::new(Instant::now()),
        }
    }

    pub fn applied(&self, report: &Report) {
        self.applies.fetch_add(1, Ordering::Relaxed);
        self.pod_failures
            .fetch_add(report.failed.len() as u64, Ordering::Relaxed);
        self.moved_to_head
            .fetch_add(report.moved_to_head as u64, Ordering::Relaxed);
        self.captured
            .store(report.captured.len() as u64, Ordering::Relaxed);
        self.ztunnel_ready
            .store(report.ztunnel.is_ready(), Ordering::Relaxed);
        self.ztunnel_draining
            .store(report.draining.is_some(), Ordering::Relaxed);
        *self.last_success.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.ready.store(true, Ordering::Relaxed);
    }

    /// New veths held (their TCP dropped) until their pod is known.
    pub fn set_held(&self, links: usize) {
        self.held.store(links as u64, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.applies.fetch_add(1, Ordering::Relaxed);
        self.apply_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The source could not reach or understand its input (watch error, bad file).
    pub fn source_error(&self) {
        self.source_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn beat(&self) {
        *self.heartbeat.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn is_alive(&self) -> bool {
        self.heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            < STUCK
    }

    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(
                out,
                "# HELP zdivert_{name} {help}\n# TYPE zdivert_{name} {kind}"
            );
            for (labels, v) in samples {
                let _ = writeln!(out, "zdivert_{name}{labels} {v}");
            }
        };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let node = format!("{{node=\"{}\",mode=\"{}\"}}", self.node, self.mode);
        metric(
            "ready",
            "gauge",
            "1 once the first sync reached the kernel.",
            &[(node.clone(), flag(self.is_ready()))],
        );
        metric(
            "ztunnel_ready",
            "gauge",
            "1 while a ztunnel is wired in (else ambient TCP is dropped).",
            &[(
                String::new(),
                flag(self.ztunnel_ready.load(Ordering::Relaxed)),
            )],
        );
        metric(
            "ztunnel_draining",
            "gauge",
            "1 while a replaced ztunnel keeps the connections it holds (a rolling update).",
            &[(
                String::new(),
                flag(self.ztunnel_draining.load(Ordering::Relaxed)),
            )],
        );
        metric(
            "pods_captured",
            "gauge",
            "Ambient pods whose traffic goes through ztunnel.",
            &[(String::new(), load(&self.captured))],
        );
        metric(
            "links_held",
            "gauge",
            "New veths whose pod is not known yet: their TCP is dropped until it is.",
            &[(String::new(), load(&self.held))],
        );
        metric(
            "reconciles_total",
            "counter",
            "Applies of the desired state to the kernel.",
            &[(String::new(), load(&self.applies))],
        );
        metric(
            "reconcile_errors_total",
            "counter",
            "Applies that failed for the whole node.",
            &[(String::new(), load(&self.apply_errors))],
        );
        metric(
            "pod_errors_total",
            "counter",
            "Pods that could not be set up in an apply (retried).",
            &[(String::new(), load(&self.pod_failures))],
        );
        metric(
            "programs_moved_to_head_total",
            "counter",
            "Programs found behind another program on their hook and moved back in front.",
            &[(String::new(), load(&self.moved_to_head))],
        );
        metric(
            "source_errors_total",
            "counter",
            "Errors reading the desired state (API watch errors, bad file).",
            &[(String::new(), load(&self.source_errors))],
        );
        let age = self
            .last_success
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed().as_secs_f64());
        metric(
            "last_sync_age_seconds",
            "gauge",
            "Seconds since the last successful apply (-1: none yet).",
            &[(String::new(), age.unwrap_or(-1.0))],
        );
        metric(
            "uptime_seconds",
            "gauge",
            "Seconds since the agent started.",
            &[(String::new(), self.started.elapsed().as_secs_f64())],
        );
        if self.mode == "ebpf" {
            match crate::status::ebpf::read(&self.bpffs, &self.node) {
                Ok(st) => {
                    metric(
                        "pods_in_map",
                        "gauge",
                        "Pod addresses in the pinned pod map.",
                        &[(String::new(), st.pods.len() as f64)],
                    );
                    let samples: Vec<(String, f64)> = st
                        .counters
                        .iter()
                        .map(|c| {
                            (
                                format!("{{path=\"{}\",outcome=\"{}\"}}", c.path, c.outcome),
                                c.packets as f64,
                            )
                        })
                        .collect();
                    metric(
                        "packets_total",
                        "counter",
                        "Packets seen by the eBPF programs, by path and verdict (summed over CPUs).",
                        &samples,
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "# pinned maps unreadable: {e}");
                }
            }
        }
        out
    }

    fn respond(&self, path: &str) -> (u16, String) {
        match path {
            "/healthz" if self.is_alive() => (200, "ok\n".into()),
            "/healthz" => (500, "the reconcile loop is stuck\n".into()),
            "/readyz" if self.is_ready() => (200, "ready\n".into()),
            "/readyz" => (
                503,
                "waiting for the first sync to reach the kernel\n".into(),
            ),
            "/metrics" => (200, self.metrics()),
            _ => (404, "not found: try /healthz, /readyz, /metrics\n".into()),
        }
    }
}

/// Serves `health` on `listener` until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, health: std::sync::Arc<Health>) {
    loop {
        let (mut conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("health listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // The request line is all that matters; read until the head ends (or the buffer is full).
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                }
            });
            if read.await.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let mut words = head.split_whitespace();
            let (status, body) = match (words.next(), words.next()) {
                (Some("GET"), Some(target)) => {
                    health.respond(target.split('?').next().unwrap_or(target))
                }
                _ => (405, "only GET\n".into()),
            };
            let reason = match status {
                200 => "OK",
                404 => "Not Found",
                405 => "Method Not Allowed",
                503 => "Service Unavailable",
                _ => "Internal Server Error",
            };
            let content_type = "text/plain; version=0.0.4; charset=utf-8";
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
