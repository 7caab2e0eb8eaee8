//! The Kubernetes source against the fake API server, through the real kube-rs client: what it
//! sends to the reconciler when the API server lists, streams changes, sends bookmarks, answers
//! 410 Gone, drops watches, is unreachable or slow. The rule under test: a complete desired
//! state or nothing, and convergence once the API server is back.
use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        mpsc::{Receiver, RecvTimeoutError, channel},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::json;
use zdivert::{
    agent::{Input, health::Health},
    source::kube::{run, select::SelectConfig},
    state::NodeState,
};
use zdivert_tests::{
    eventually,
    fakeapi::{
        FakeApi, Kind,
        objects::{namespace, pod_on, ztunnel_on},
    },
};

const NODE: &str = "node-a";

struct Fixture {
    api: FakeApi,
    _rt: tokio::runtime::Runtime,
    states: Receiver<Input>,
    health: Arc<Health>,
}

fn ips(v4: &str) -> Vec<String> {
    vec![v4.to_string()]
}

/// Namespace `apps` labelled ambient with pods a and b on NODE, one pod on another node, and
/// NODE's ztunnel; then the source, started against it.
fn start(delay: Duration) -> Result<Fixture> {
    let api = FakeApi::start()?;
    api.apply(namespace("apps", Some("ambient")))?;
    api.apply(namespace("istio-system", None))?;
    api.apply(pod_on(NODE, "apps", "a", &ips("10.0.0.3")))?;
    api.apply(pod_on(NODE, "apps", "b", &ips("10.0.0.4")))?;
    api.apply(pod_on("node-b", "apps", "elsewhere", &ips("10.0.1.3")))?;
    api.apply(ztunnel_on(NODE, "ztunnel-a", &ips("10.0.0.10")))?;
    api.set_delay(delay);
    let addr = api.listen()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // The client's buffer task runs on the runtime.
    let _entered = rt.enter();
    let client = kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse()?))?;
    let (tx, states) = channel();
    let health = Arc::new(Health::new(NODE, "test"));
    rt.spawn(run(
        client,
        SelectConfig::new(NODE, "istio-system"),
        tx,
        health.clone(),
        None,
    ));
    Ok(Fixture {
        api,
        _rt: rt,
        states,
        health,
    })
}

fn names(s: &NodeState) -> BTreeSet<String> {
    s.pods.keys().map(|p| p.name.clone()).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

impl Fixture {
    /// Every state sent until one has exactly `pods`; fails after `within`.
    fn until(&self, pods: &[&str], within: Duration) -> Result<Vec<NodeState>> {
        let deadline = Instant::now() + within;
        let mut seen = vec![];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.states.recv_timeout(left) {
                Ok(Input::NewLinks(l)) => bail!("a source sent links: {l:?}"),
                Ok(Input::Cni(r)) => bail!("a source sent a CNI request: {r:?}"),
                Ok(Input::State(s)) => {
                    let done = names(&s) == set(pods);
                    seen.push(s);
                    if done {
                        return Ok(seen);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "no state with pods {pods:?} within {within:?}; sent: {:?}",
                        seen.iter().map(names).collect::<Vec<_>>()
                    )
                }
                Err(e) => bail!("source stopped: {e}"),
            }
        }
    }

    /// Nothing is sent for `quiet`.
    fn nothing_for(&self, quiet: Duration) -> Result<()> {
        match self.states.recv_timeout(quiet) {
            Ok(Input::State(s)) => bail!("a state was sent: pods {:?}", names(&s)),
            Ok(Input::NewLinks(l)) => bail!("a source sent links: {l:?}"),
            Ok(Input::Cni(r)) => bail!("a source sent a CNI request: {r:?}"),
            Err(RecvTimeoutError::Timeout) => Ok(()),
            Err(e) => bail!("source stopped: {e}"),
        }
    }

    fn lists(&self, path: &str) -> usize {
        self.api
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == path && !r.is_watch())
            .count()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.api.cut_watches();
    }
}

#[test]
fn lists_once_then_follows_changes() -> Result<()> {
    let f = start(Duration::ZERO)?;
    let first = f.until(&["a", "b"], Duration::from_secs(10))?;
    assert_eq!(
        first.len(),
        1,
        "one complete state after the initial lists, never a partial one"
    );
    let z = first[0].ztunnel.as_ref().context("ztunnel selected")?;
    assert_eq!(z.pod.name, "ztunnel-a");
    assert_eq!(z.netns, None, "the netns is left to the node facts");

    f.api.apply(pod_on(NODE, "apps", "c", &ips("10.0.0.5")))?;
    f.until(&["a", "b", "c"], Duration::from_secs(10))?;
    f.api.delete(Kind::Pod, "apps", "a")?;
    f.until(&["b", "c"], Duration::from_secs(10))?;
    // The namespace label decides for its pods.
    f.api.apply(namespace("apps", None))?;
    f.until(&[], Duration::from_secs(10))?;
    f.api.apply(namespace("apps", Some("ambient")))?;
    f.until(&["b", "c"], Duration::from_secs(10))?;
    // A change on another node is not even seen (the watch is node-scoped).
    f.api
        .apply(pod_on("node-b", "apps", "elsewhere-2", &ips("10.0.1.4")))?;
    f.nothing_for(Duration::from_secs(1))?;

    let pod_lists: Vec<_> = f
        .api
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/v1/pods")
        .collect();
    assert!(
        pod_lists
            .iter()
            .all(|r| r.query.get("fieldSelector").map(String::as_str)
                == Some(&*format!("spec.nodeName={NODE}"))),
        "every pod request is node-scoped: {pod_lists:?}"
    );
    assert_eq!(
        f.lists("/api/v1/pods"),
        1,
        "no relist while the watch works"
    );
    Ok(())
}

#[test]
fn a_cut_watch_resumes_from_the_last_bookmark_without_relisting() -> Result<()> {
    let f = start(Duration::ZERO)?;
    f.until(&["a", "b"], Duration::from_secs(10))?;
    let listed_at = f.api.resource_version();
    // Changes elsewhere move the resourceVersion on; only bookmarks tell this watch about it.
    for i in 0..5 {
        f.api.apply(pod_on(
            "node-b",
            "apps",
            &format!("other-{i}"),
            &ips(&format!("10.0.1.{}", 10 + i)),
        ))?;
    }
    let moved_to = f.api.resource_version();
    eventually(
        "a bookmark at the new version",
        Duration::from_secs(10),
        || Ok(f.api.bookmarked(Kind::Pod) >= Some(moved_to)),
    )?;
    let watches = f.api.watches("/api/v1/pods");
    f.api.cut_watches();
    eventually("the watch re-opened", Duration::from_secs(10), || {
        Ok(f.api.watches("/api/v1/pods") > watches)
    })?;
    f.api.apply(pod_on(NODE, "apps", "c", &ips("10.0.0.5")))?;
    f.until(&["a", "b", "c"], Duration::from_secs(10))?;

    let resumed: Vec<u64> = f
        .api
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/pods" && r.is_watch())
        .filter_map(|r| r.query.get("resourceVersion")?.parse().ok())
        .collect();
    assert!(resumed.len() >= 2, "the watch was re-opened: {resumed:?}");
    assert!(
        resumed
            .iter()
            .skip(1)
            .any(|rv| *rv >= moved_to && *rv > listed_at),
        "resumed from the bookmark ({moved_to}), not from the list ({listed_at}): {resumed:?}"
    );
    assert_eq!(
        f.lists("/api/v1/pods"),
        1,
        "a cut watch is resumed, not relisted"
    );
    Ok(())
}

#[test]
fn gone_410_relists_and_never_sends_a_partial_state() -> Result<()> {
    let f = start(Duration::ZERO)?;
    f.until(&["a", "b"], Duration::from_secs(10))?;
    f.api.expire();
    f.api.apply(pod_on(NODE, "apps", "c", &ips("10.0.0.5")))?;
    let seen = f.until(&["a", "b", "c"], Duration::from_secs(15))?;
    for s in &seen {
        assert!(
            names(s).is_superset(&set(&["a", "b"])),
            "a state without a or b was sent during the relist: {:?}",
            names(s)
        );
    }
    assert!(
        f.lists("/api/v1/pods") >= 2,
        "410 Gone made the watcher list again"
    );
    Ok(())
}

#[test]
fn an_unreachable_api_server_changes_nothing_until_it_is_back() -> Result<()> {
    let f = start(Duration::ZERO)?;
    f.until(&["a", "b"], Duration::from_secs(10))?;
    f.api.set_down(true);
    // What changes in the cluster meanwhile is invisible; nothing (least of all an empty state)
    // is sent.
    f.api.delete(Kind::Pod, "apps", "a")?;
    f.api.apply(json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "more", "labels": {"istio.io/dataplane-mode": "ambient"}}}))?;
    f.api.apply(pod_on(NODE, "more", "d", &ips("10.0.0.6")))?;
    f.nothing_for(Duration::from_secs(4))?;
    let errors = metric(&f.health, "zdivert_source_errors_total");
    assert!(errors > 0.0, "the failing watches are counted");
    f.api.set_down(false);
    f.until(&["b", "d"], Duration::from_secs(20))?;
    Ok(())
}

#[test]
fn a_slow_api_server_still_converges() -> Result<()> {
    let f = start(Duration::from_millis(1500))?;
    f.until(&["a", "b"], Duration::from_secs(20))?;
    f.api.apply(pod_on(NODE, "apps", "c", &ips("10.0.0.5")))?;
    f.until(&["a", "b", "c"], Duration::from_secs(20))?;
    Ok(())
}

fn metric(h: &Health, name: &str) -> f64 {
    h.metrics()
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .map(|v| v.trim().parse().unwrap_or(f64::NAN))
        })
        .unwrap_or(f64::NAN)
}
