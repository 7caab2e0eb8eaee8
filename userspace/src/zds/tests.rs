//! The agent's side of ZDS against ztunnel's side played over a socketpair. The real in-pod
//! ztunnel is served in `tests/tests/zds.rs`.
use std::{os::fd::OwnedFd, os::unix::fs::MetadataExt, thread, time::Duration};

use prost::Message;

use super::{
    messages::{Ack, Request, Response, WorkloadRequest, WorkloadResponse, ZdsHello},
    *,
};

fn workload(uid: &str, netns: bool) -> WorkloadNetns {
    WorkloadNetns {
        uid: uid.into(),
        info: WorkloadInfo {
            name: format!("pod-{uid}"),
            namespace: "default".into(),
            service_account: "sa".into(),
        },
        netns: netns.then(|| OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap())),
    }
}

fn hello(ztunnel: &Peer, version: i32) {
    ztunnel
        .send(&ZdsHello { version }.encode_to_vec(), None)
        .unwrap();
}

/// ztunnel's side: takes one request, answers `error` (empty: success).
fn answer(ztunnel: &Peer, error: &str) -> (Request, Option<OwnedFd>) {
    let mut buf = [0u8; MAX_MESSAGE];
    let (n, fd) = ztunnel.recv_with_fd(&mut buf).unwrap();
    let request = WorkloadRequest::decode(&buf[..n]).unwrap().payload.unwrap();
    let ack = WorkloadResponse {
        payload: Some(Response::Ack(Ack {
            error: error.into(),
        })),
    };
    ztunnel.send(&ack.encode_to_vec(), None).unwrap();
    (request, fd)
}

#[test]
fn the_snapshot_hands_over_each_netns_then_says_it_is_complete() {
    let (agent, ztunnel) = Peer::pair().unwrap();
    let zt = thread::spawn(move || {
        hello(&ztunnel, 1);
        let (add, fd) = answer(&ztunnel, "");
        let (keep, no_fd) = answer(&ztunnel, "");
        let (refused, _) = answer(&ztunnel, "no such netns");
        let (sent, _) = answer(&ztunnel, "");
        let (del, _) = answer(&ztunnel, "");
        (add, fd, keep, no_fd.is_none(), refused, sent, del)
    });
    let snapshot = [
        workload("a", true),
        workload("b", false),
        workload("c", true),
    ];
    let (mut session, report) = Session::open(agent, ACK_TIMEOUT, &snapshot).unwrap();
    session.del("a").unwrap();
    let (add, fd, keep, keep_without_fd, refused, sent, del) = zt.join().unwrap();

    let Request::Add(add) = add else {
        panic!("{add:?}")
    };
    assert_eq!(add.uid, "a");
    assert_eq!(add.workload_info.unwrap().name, "pod-a");
    let passed = std::fs::File::from(fd.expect("the netns fd"))
        .metadata()
        .unwrap();
    let ours = std::fs::metadata("/proc/self/ns/net").unwrap();
    assert_eq!((passed.dev(), passed.ino()), (ours.dev(), ours.ino()));
    assert!(matches!(keep, Request::Keep(k) if k.uid == "b"));
    assert!(keep_without_fd);
    assert!(matches!(refused, Request::Add(a) if a.uid == "c"));
    assert!(matches!(sent, Request::SnapshotSent(_)));
    assert!(matches!(del, Request::Del(d) if d.uid == "a"));
    let refused: Vec<String> = report.refused.iter().map(ToString::to_string).collect();
    assert_eq!(refused, ["ztunnel refused add c: no such netns"]);
}

/// A peer that breaks the protocol ends its session with the reason; nothing was sent after.
#[test]
fn a_peer_that_breaks_the_protocol_is_told_apart() {
    type Misbehave = fn(Peer) -> Option<Peer>;
    let cases: [(&str, Misbehave, &str); 5] = [
        (
            "wrong version",
            |z| {
                hello(&z, 2);
                Some(z)
            },
            "ZDS version 2",
        ),
        (
            "oversized",
            |z| {
                z.send(&[0u8; MAX_MESSAGE + 1], None).unwrap();
                Some(z)
            },
            "longer than",
        ),
        (
            "not protobuf",
            |z| {
                z.send(&[0xff, 0xff], None).unwrap();
                Some(z)
            },
            "not a ZdsHello",
        ),
        ("closed", |_| None, "closed"),
        ("silent", Some, "no answer"),
    ];
    for (name, misbehave, want) in cases {
        let (agent, ztunnel) = Peer::pair().unwrap();
        let zt = thread::spawn(move || {
            let ztunnel = misbehave(ztunnel)?;
            let mut buf = [0u8; MAX_MESSAGE];
            ztunnel
                .set_receive_timeout(Duration::from_millis(500))
                .unwrap();
            // What the agent sent after the fault: nothing, until it closed.
            Some(
                ztunnel
                    .recv(&mut buf)
                    .map(|r| matches!(r, seqpacket::Received::Message(_))),
            )
        });
        let err = Session::open(agent, Duration::from_millis(200), &[workload("a", true)])
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(err.to_string().contains(want), "{name}: {err}");
        if let Some(sent_more) = zt.join().unwrap() {
            assert!(!sent_more.unwrap(), "{name}: the agent went on sending");
        }
    }
}

#[test]
fn an_ack_that_never_comes_fails_the_request_not_the_agent() {
    let (agent, ztunnel) = Peer::pair().unwrap();
    let zt = thread::spawn(move || {
        hello(&ztunnel, 1);
        answer(&ztunnel, "");
        let mut buf = [0u8; MAX_MESSAGE];
        // Reads the add and never acks it.
        ztunnel.recv(&mut buf).unwrap();
        thread::sleep(Duration::from_millis(500));
    });
    let (mut session, _) = Session::open(agent, Duration::from_millis(200), &[]).unwrap();
    let err = session.add(&workload("late", true)).unwrap_err();
    assert!(matches!(err, SessionError::NoAnswer(_)), "{err}");
    zt.join().unwrap();
}

/// A restarted agent serves its socket before it knows its pods: a ztunnel that connects then
/// must wait for the snapshot, not get an empty one (it would drop every pod it serves).
#[test]
fn no_snapshot_before_the_agent_knows_its_pods() {
    let dir = std::env::temp_dir().join(format!("zdivert-zds-unit-{}", std::process::id()));
    let server = Server::start(&dir.join("ztunnel.sock")).unwrap();
    let ztunnel = Peer::connect(server.path()).unwrap();
    hello(&ztunnel, 1);
    ztunnel
        .set_receive_timeout(Duration::from_millis(300))
        .unwrap();
    let mut buf = [0u8; MAX_MESSAGE];
    let early = ztunnel.recv(&mut buf);
    assert!(early.is_err(), "a snapshot before the pods were known");

    let netns = dir.join("netns");
    std::fs::write(&netns, "").unwrap();
    let w = InPodWorkload {
        uid: "a".into(),
        info: workload("a", false).info,
        netns,
        ips: vec![],
    };
    server.set([("a".to_string(), w)].into());
    ztunnel.set_receive_timeout(ACK_TIMEOUT).unwrap();
    let (add, fd) = answer(&ztunnel, "");
    assert!(matches!(add, Request::Add(a) if a.uid == "a"));
    assert!(fd.is_some());
    let (sent, _) = answer(&ztunnel, "");
    assert!(matches!(sent, Request::SnapshotSent(_)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// What ztunnel acked is told before `snapshot_sent` goes out (ztunnel is not ready before),
/// refusals left out; a later add once acked.
#[test]
fn acks_are_told_before_the_snapshot_is_complete() {
    let dir = std::env::temp_dir().join(format!("zdivert-zds-acked-{}", std::process::id()));
    let server = Server::start(&dir.join("ztunnel.sock")).unwrap();
    let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(i32, String)>::new()));
    let record = told.clone();
    server.on_acked(std::sync::Arc::new(move |pid, pods| {
        let mut told = record.lock().unwrap();
        told.extend(pods.iter().map(|w| (pid, w.uid.clone())));
    }));
    let netns = dir.join("netns");
    std::fs::write(&netns, "").unwrap();
    let w = |uid: &str| InPodWorkload {
        uid: uid.into(),
        info: workload(uid, false).info,
        netns: netns.clone(),
        ips: vec![],
    };
    server.set([("a".to_string(), w("a")), ("b".to_string(), w("b"))].into());
    let ztunnel = Peer::connect(server.path()).unwrap();
    ztunnel.set_receive_timeout(ACK_TIMEOUT).unwrap();
    hello(&ztunnel, 1);
    answer(&ztunnel, "");
    answer(&ztunnel, "no such netns");
    let me = std::process::id() as i32;
    // Told before the server sent it: what is recorded now was recorded before.
    let (sent, _) = answer(&ztunnel, "");
    assert!(matches!(sent, Request::SnapshotSent(_)));
    assert_eq!(*told.lock().unwrap(), vec![(me, "a".to_string())]);

    server.set([("a".to_string(), w("a")), ("c".to_string(), w("c"))].into());
    let mut requests = vec![answer(&ztunnel, "").0, answer(&ztunnel, "").0];
    requests.sort_by_key(|r| matches!(r, Request::Add(_)));
    assert!(
        matches!(&requests[1], Request::Add(a) if a.uid == "c"),
        "{requests:?}"
    );
    let deadline = std::time::Instant::now() + ACK_TIMEOUT;
    while told.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        *told.lock().unwrap(),
        vec![(me, "a".to_string()), (me, "c".to_string())]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
