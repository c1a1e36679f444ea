//! Shutdown and restart, end to end: the drain phase (readiness, RSTs for
//! new connections, established ones finishing), its triggers and timing,
//! and connections surviving a crash or an upgrade through the pins.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn url() -> String {
    format!("{LISTEN}:80")
}

fn ready_code(lb: &NsRef) -> Option<u16> {
    lb.run(|| http_get("127.0.0.1:9090", "/readyz").ok().map(|r| r.status))
}

/// A new connection through XLB: Ok(()) if it is answered, or the error.
fn try_connect(client: &NsRef) -> std::io::Result<()> {
    client.run(|| http_get(&url(), "/").map(drop))
}

fn xdp_attached(lb: &NsRef) -> bool {
    String::from_utf8_lossy(&lb.exec("ip -d link show").stdout).contains("prog/xdp")
}

enum Trigger {
    Sigterm,
    ShutdownFile,
}

/// Drains with `trigger`; checks readiness, RSTs, the transfer in flight,
/// exit timing and cleanup.
fn drain(trigger: Trigger) {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let file = tempfile::tempdir().unwrap();
    let shutdown_file = file.path().join("shutdown");
    let mut xlb = XlbProcess::start(
        &t.lb,
        &lb_config(2, &format!("shutdown_timeout: 3\nshutdown_file: {}\n", shutdown_file.display())),
    );
    let instance = xlb.instance.clone().unwrap();
    assert!(pin_dir(&instance).exists(), "pinned while running");

    // A ~2 s transfer that is still running when the drain starts.
    const SIZE: usize = 4 * 1024 * 1024;
    let transfer = t.client.spawn(|| http_get(&url(), &format!("/slow/{SIZE}")));
    std::thread::sleep(Duration::from_millis(300));

    let t0 = Instant::now();
    match trigger {
        Trigger::Sigterm => xlb.signal(Signal::SIGTERM),
        Trigger::ShutdownFile => std::fs::write(&shutdown_file, "").unwrap(),
    }
    let unready = wait_for(Duration::from_secs(2), || (ready_code(&t.lb) == Some(503)).then(Instant::now));
    let unready = unready.expect("readiness fails during drain");
    assert!(unready - t0 < Duration::from_millis(1500), "readiness flipped after {:?}", unready - t0);

    // Timed inside the client's namespace: the connection attempt only.
    let (refused, took) = t.client.run(|| {
        let c0 = Instant::now();
        let r = http_get(&url(), "/").map(drop);
        (r, c0.elapsed())
    });
    let err = refused.expect_err("a new connection during drain is refused");
    assert!(
        matches!(err.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset),
        "refused with a reset, not a timeout: {err}"
    );
    assert!(took < Duration::from_millis(100), "refusal took {took:?}");
    let rst = wait_for(Duration::from_secs(2), || (counter(&status(&t.lb), "drain_rst") >= 1).then_some(()));
    assert!(rst.is_some(), "XDP counted the RST");

    let body = transfer.join().unwrap().expect("the transfer started before the drain completes");
    assert!(body.body == blob(SIZE), "transfer is byte-identical");

    let status = xlb.wait(Duration::from_secs(10)).expect("xlb exits after shutdown_timeout");
    let exited = t0.elapsed();
    assert!(status.success(), "exit 0: {}", xlb.log());
    assert!(
        exited > Duration::from_millis(2500) && exited < Duration::from_millis(4500),
        "exit {exited:?} after the trigger; shutdown_timeout is 3 s"
    );
    assert!(!xdp_attached(&t.lb), "detached on exit");
    assert!(!pin_dir(&instance).exists(), "pins removed on exit");
    let log = xlb.log();
    assert!(log.contains("drain done"), "{log}");
    assert!(try_connect(&t.client).is_err());
}

#[test]
fn sigterm_drains_then_exits() {
    drain(Trigger::Sigterm);
}

#[test]
fn shutdown_file_drains_then_exits() {
    drain(Trigger::ShutdownFile);
}

#[test]
fn second_signal_ends_the_drain_at_once() {
    let t = Topology::new(1);
    let _b1 = start_backend(&t.backends[0], "be1");
    let mut xlb = XlbProcess::start(&t.lb, &lb_config(1, "shutdown_timeout: 60\n"));
    xlb.signal(Signal::SIGTERM);
    wait_for(Duration::from_secs(2), || (ready_code(&t.lb) == Some(503)).then_some(())).expect("draining");
    let t0 = Instant::now();
    xlb.signal(Signal::SIGINT);
    let st = xlb.wait(Duration::from_secs(5)).expect("exits at the second signal");
    assert!(st.success());
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(!xdp_attached(&t.lb));
}

#[test]
fn zero_shutdown_timeout_exits_at_once() {
    let t = Topology::new(1);
    let _b1 = start_backend(&t.backends[0], "be1");
    let mut xlb = XlbProcess::start(&t.lb, &lb_config(1, "shutdown_timeout: 0\n"));
    let t0 = Instant::now();
    xlb.signal(Signal::SIGTERM);
    let st = xlb.wait(Duration::from_secs(5)).expect("exits");
    assert!(st.success());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

/// 20 long-lived connections, each proven alive by an echo.
fn open_connections(client: &NsRef) -> std::thread::JoinHandle<Vec<EchoConn>> {
    client.spawn(|| {
        (0..20)
            .map(|i| {
                let mut c = EchoConn::open(&url()).unwrap_or_else(|e| panic!("connection {i}: {e}"));
                c.ping(&format!("hello {i}")).unwrap();
                c
            })
            .collect()
    })
}

fn ping_all(conns: &mut [EchoConn], round: &str) {
    for (i, c) in conns.iter_mut().enumerate() {
        c.ping(&format!("{round} {i}")).unwrap_or_else(|e| panic!("connection {i} after {round}: {e}"));
    }
}

#[test]
fn connections_survive_sigkill_and_restart() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let cfg = lb_config(2, "shutdown_timeout: 1\n");
    let mut first = XlbProcess::start(&t.lb, &cfg);
    let mut conns = open_connections(&t.client).join().unwrap();

    first.signal(Signal::SIGKILL);
    first.wait(Duration::from_secs(5)).expect("killed");
    assert!(xdp_attached(&t.lb), "the pinned program keeps running after a crash");
    ping_all(&mut conns, "after the crash");

    let second = XlbProcess::start(&t.lb, &cfg);
    assert!(second.log().contains("adopted 20 live connections"), "{}", second.log());
    ping_all(&mut conns, "after the restart");
    assert_eq!(counter(&status(&t.lb), "drop_no_flow"), 0, "no packet of a live connection was lost");
    let body = t.client.run(|| http_get(&url(), "/").map(|r| r.body)).expect("new connections work");
    assert!(body.starts_with(b"backend be"));
    drop(first);
    drop(second);
}

#[test]
fn sigusr2_hands_over_to_a_new_binary() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let cfg = lb_config(2, "shutdown_timeout: 1\n");
    let mut old = XlbProcess::start(&t.lb, &cfg);
    let mut conns = open_connections(&t.client).join().unwrap();

    old.signal(Signal::SIGUSR2);
    assert!(old.wait(Duration::from_secs(5)).expect("exits at once").success());
    ping_all(&mut conns, "between binaries");

    // "A new binary": another file, run fresh.
    let dir = tempfile::tempdir().unwrap();
    let new_bin = dir.path().join("xlb-new");
    std::fs::copy(env!("CARGO_BIN_EXE_xlb"), &new_bin).unwrap();
    let mut new = XlbProcess::start_binary(&t.lb, &cfg, &new_bin);
    assert!(new.log().contains("adopted 20 live connections"), "{}", new.log());
    ping_all(&mut conns, "after the upgrade");
    assert!(new.terminate().success());
    drop(old);
}

#[test]
fn detach_removes_what_a_crashed_instance_left() {
    let t = Topology::new(1);
    let _b1 = start_backend(&t.backends[0], "be1");
    let cfg = lb_config(1, "");
    let mut x = XlbProcess::start(&t.lb, &cfg);
    let instance = x.instance.clone().unwrap();
    x.signal(Signal::SIGKILL);
    x.wait(Duration::from_secs(5)).expect("killed");
    assert!(xdp_attached(&t.lb));
    assert!(try_connect(&t.client).is_ok(), "still balancing after the crash");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(["detach", "--instance", &instance])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed"));
    assert!(!pin_dir(&instance).exists());
    wait_for(Duration::from_secs(3), || (!xdp_attached(&t.lb)).then_some(())).expect("XDP detached");
    assert!(try_connect(&t.client).is_err(), "nothing balances any more");
}

#[test]
fn incompatible_pins_are_refused_with_a_way_out() {
    let t = Topology::new(1);
    let _b1 = start_backend(&t.backends[0], "be1");
    let cfg = lb_config(1, "conntrack_capacity: 1000\n");
    let mut first = XlbProcess::start(&t.lb, &cfg);
    let instance = first.instance.clone().unwrap();
    first.signal(Signal::SIGKILL);
    first.wait(Duration::from_secs(5)).expect("killed");

    // Same instance, a conntrack map of another size: never silently reused.
    let resized = cfg.replace("conntrack_capacity: 1000", "conntrack_capacity: 2000");
    let mut second = XlbProcess::spawn(&t.lb, &resized);
    let st = second.wait(Duration::from_secs(20)).expect("refuses and exits");
    assert_eq!(st.code(), Some(1));
    let log = second.log();
    assert!(
        log.contains("cannot be adopted") && log.contains(&format!("xlb detach --instance {instance}")),
        "{log}"
    );
    assert!(try_connect(&t.client).is_ok(), "the earlier program still serves");
    drop(first);
}

#[test]
fn a_second_instance_of_the_same_name_is_refused() {
    let t = Topology::new(1);
    let _b1 = start_backend(&t.backends[0], "be1");
    let cfg = lb_config(1, "");
    let _first = XlbProcess::start(&t.lb, &cfg);
    let mut second = XlbProcess::spawn(&t.lb, &format!("{cfg}admin: {{address: 127.0.0.1, port: 9091}}\n"));
    second.instance = None; // the pins are the first one's
    let st = second.wait(Duration::from_secs(20)).expect("refuses and exits");
    assert_eq!(st.code(), Some(1));
    assert!(second.log().contains("is already running"), "{}", second.log());
    assert!(try_connect(&t.client).is_ok(), "the first instance is untouched");
}
