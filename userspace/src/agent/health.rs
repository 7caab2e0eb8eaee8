//! One HTTP listener (hyper) for the kubelet's probes and Prometheus: `/healthz` (the reconcile
//! loop is alive), `/readyz` (the first sync reached the kernel) and `/metrics`. The metrics live
//! in one `prometheus-client` registry: the agent registers its own here, each dataplane its
//! own (`Dataplane::register_metrics`). A scrape reads what they hold; it walks no map and opens
//! no pin.
use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::dataplane::{Dataplane, Report};

/// A reconcile loop that has not come round for this long is stuck: liveness fails.
const STUCK: Duration = Duration::from_secs(120);

type Labels = Vec<(&'static str, String)>;

/// The agent's own metrics.
#[derive(Default)]
struct Metrics {
    ready: Family<Labels, Gauge>,
    ztunnel_ready: Gauge,
    ztunnel_draining: Gauge,
    pods_captured: Gauge,
    links_held: Gauge,
    reconciles: Counter,
    reconcile_errors: Counter,
    pod_errors: Counter,
    programs_moved_to_head: Counter,
    redirections_repaired: Counter,
    source_errors: Counter,
    last_sync_age_seconds: Gauge<f64, AtomicU64>,
    uptime_seconds: Gauge<f64, AtomicU64>,
}

impl Metrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "ready",
            "1 once the first sync reached the kernel",
            self.ready.clone(),
        );
        r.register(
            "ztunnel_ready",
            "1 while a ztunnel is wired in (else ambient TCP is dropped)",
            self.ztunnel_ready.clone(),
        );
        r.register(
            "ztunnel_draining",
            "1 while a replaced ztunnel keeps the connections it holds (a rolling update)",
            self.ztunnel_draining.clone(),
        );
        r.register(
            "pods_captured",
            "Ambient pods whose traffic goes through ztunnel",
            self.pods_captured.clone(),
        );
        r.register(
            "links_held",
            "New veths whose pod is not known yet: their TCP is dropped until it is",
            self.links_held.clone(),
        );
        r.register(
            "reconciles",
            "Applies of the desired state to the kernel",
            self.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Applies that failed for the whole node",
            self.reconcile_errors.clone(),
        );
        r.register(
            "pod_errors",
            "Pods that could not be set up in an apply (retried)",
            self.pod_errors.clone(),
        );
        r.register(
            "programs_moved_to_head",
            "Programs found behind another program on their hook and moved back in front",
            self.programs_moved_to_head.clone(),
        );
        r.register(
            "redirections_repaired",
            "Redirections found partly gone from the kernel (a filter, qdisc, link or rule deleted) and put back",
            self.redirections_repaired.clone(),
        );
        r.register(
            "source_errors",
            "Errors reading the desired state (API watch errors, bad file)",
            self.source_errors.clone(),
        );
        r.register(
            "last_sync_age_seconds",
            "Seconds since the last successful apply (-1: none yet)",
            self.last_sync_age_seconds.clone(),
        );
        r.register(
            "uptime_seconds",
            "Seconds since the agent started",
            self.uptime_seconds.clone(),
        );
    }
}

pub struct Health {
    node: String,
    mode: &'static str,
    started: Instant,
    ready: AtomicBool,
    metrics: Metrics,
    registry: Registry,
    last_success: Mutex<Option<Instant>>,
    heartbeat: Mutex<Instant>,
}

impl Health {
    pub fn new(node: &str, mode: &'static str) -> Self {
        let metrics = Metrics::default();
        let mut registry = Registry::with_prefix("zdivert");
        metrics.register(&mut registry);
        let health = Health {
            node: node.into(),
            mode,
            started: Instant::now(),
            ready: AtomicBool::new(false),
            metrics,
            registry,
            last_success: Mutex::new(None),
            heartbeat: Mutex::new(Instant::now()),
        };
        health.set_ready(false);
        health
    }

    /// With the dataplane's own metrics registered beside the agent's.
    pub fn with_dataplane(mut self, dp: &dyn Dataplane) -> Self {
        dp.register_metrics(&mut self.registry);
        self
    }

    fn set_ready(&self, ready: bool) {
        self.ready
            .store(ready, std::sync::atomic::Ordering::Relaxed);
        let labels = vec![("node", self.node.clone()), ("mode", self.mode.to_string())];
        self.metrics.ready.get_or_create(&labels).set(ready.into());
    }

    pub fn applied(&self, report: &Report) {
        let m = &self.metrics;
        m.reconciles.inc();
        m.pod_errors.inc_by(report.failed.len() as u64);
        m.programs_moved_to_head.inc_by(report.moved_to_head as u64);
        m.redirections_repaired.inc_by(report.repaired as u64);
        m.pods_captured.set(report.captured.len() as i64);
        m.ztunnel_ready.set(report.ztunnel.is_ready().into());
        m.ztunnel_draining.set(report.draining.is_some().into());
        *self.last_success.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.set_ready(true);
    }

    pub fn failed(&self) {
        self.metrics.reconciles.inc();
        self.metrics.reconcile_errors.inc();
    }

    /// New veths held (their TCP dropped) until their pod is known.
    pub fn set_held(&self, links: usize) {
        self.metrics.links_held.set(links as i64);
    }

    /// The source could not reach or understand its input (watch error, bad file).
    pub fn source_error(&self) {
        self.metrics.source_errors.inc();
    }

    pub fn beat(&self) {
        *self.heartbeat.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn is_alive(&self) -> bool {
        self.heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            < STUCK
    }

    /// The registry in the text exposition format.
    pub fn metrics(&self) -> String {
        let age = self
            .last_success
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(-1.0, |t| t.elapsed().as_secs_f64());
        self.metrics.last_sync_age_seconds.set(age);
        self.metrics
            .uptime_seconds
            .set(self.started.elapsed().as_secs_f64());
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            out = format!("# encoding the metrics failed: {e}\n");
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

/// Serves `health` on `listener` until the runtime stops. One request per connection: probes and
/// scrapers reconnect anyway, and nothing idles on the agent.
pub async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>) {
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("health listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(answer(&health, &req)) }
            });
            let served = http1::Builder::new()
                .keep_alive(false)
                .header_read_timeout(Duration::from_secs(5))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(conn), service)
                .await;
            if let Err(e) = served {
                log::debug!("health connection: {e}");
            }
        });
    }
}

fn answer(health: &Health, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = if req.method() == hyper::Method::GET {
        health.respond(req.uri().path())
    } else {
        (405, "only GET\n".into())
    };
    let content_type = if req.uri().path() == "/metrics" {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
