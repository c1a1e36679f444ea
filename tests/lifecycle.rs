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
    let s = status(&t.lb);
    let lost = counter(&s, "drop_no_flow") + counter(&s, "rst_unknown_flow");
    assert_eq!(lost, 0, "no packet of a live connection was dropped or reset");
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

enum First {
    File,
    Sigterm,
}

/// The kubelet's order (preStop creates the shutdown file, SIGTERM follows
/// `gap` later) and the reverse: one drain of the full shutdown_timeout.
fn one_drain_whatever_delivers_it(first: First, gap: Duration) {
    let t = Topology::new(1);
    let _b1 = start_backend(&t.backends[0], "be1");
    let file = tempfile::tempdir().unwrap();
    let shutdown_file = file.path().join("shutdown");
    let mut xlb = XlbProcess::start(
        &t.lb,
        &lb_config(1, &format!("shutdown_timeout: 5\nshutdown_file: {}\n", shutdown_file.display())),
    );
    const SIZE: usize = 4 * 1024 * 1024;
    let transfer = t.client.spawn(|| http_get(&url(), &format!("/slow/{SIZE}")));
    std::thread::sleep(Duration::from_millis(200));

    let t0 = Instant::now();
    let touch = || std::fs::write(&shutdown_file, "").unwrap();
    match first {
        First::File => {
            touch();
            std::thread::sleep(gap);
            xlb.signal(Signal::SIGTERM);
        }
        First::Sigterm => {
            xlb.signal(Signal::SIGTERM);
            std::thread::sleep(gap);
            touch();
        }
    }
    let unready = wait_for(Duration::from_secs(2), || (ready_code(&t.lb) == Some(503)).then_some(()));
    assert!(unready.is_some(), "readiness fails during the drain");
    let body = transfer.join().unwrap().expect("the download started before the drain completes");
    assert!(body.body == blob(SIZE), "byte-identical");
    // Nothing else on the wire now: each refusal arrives on its own.
    for probe in 0..3 {
        let (r, took) = t.client.run(|| {
            let c0 = Instant::now();
            (
                std::net::TcpStream::connect_timeout(&url().parse().unwrap(), Duration::from_secs(2))
                    .map(drop),
                c0.elapsed(),
            )
        });
        let e = r.expect_err("refused during the drain");
        assert!(
            matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset),
            "probe {probe}: {e}"
        );
        assert!(took < Duration::from_millis(100), "probe {probe} took {took:?}");
    }
    // XDP sent those RSTs: the node's own stack would refuse a SYN to the
    // listen address too, so the counter is the proof.
    let sent = wait_for(Duration::from_secs(2), || (counter(&status(&t.lb), "drain_rst") >= 3).then_some(()));
    assert!(sent.is_some(), "XDP counted the RSTs: {}", status(&t.lb)["counters"]);
    let st = xlb.wait(Duration::from_secs(10)).expect("exits after shutdown_timeout");
    let exited = t0.elapsed();
    assert!(st.success(), "{}", xlb.log());
    assert!(
        exited > Duration::from_secs(4) && exited < Duration::from_secs(7),
        "exit {exited:?} after the first trigger; shutdown_timeout is 5 s\n{}",
        xlb.log()
    );
    let log = xlb.log();
    assert!(log.contains("into the drain: the drain continues") || log.contains("already draining"), "{log}");
}

#[test]
fn shutdown_file_then_sigterm_at_once() {
    one_drain_whatever_delivers_it(First::File, Duration::ZERO);
}

#[test]
fn shutdown_file_then_sigterm_after_50ms() {
    one_drain_whatever_delivers_it(First::File, Duration::from_millis(50));
}

#[test]
fn shutdown_file_then_sigterm_after_400ms() {
    one_drain_whatever_delivers_it(First::File, Duration::from_millis(400));
}

#[test]
fn shutdown_file_then_sigterm_after_1500ms() {
    one_drain_whatever_delivers_it(First::File, Duration::from_millis(1500));
}

#[test]
fn sigterm_then_shutdown_file() {
    one_drain_whatever_delivers_it(First::Sigterm, Duration::from_millis(300));
}

#[test]
fn sigusr2_during_a_drain_is_refused() {
    let t = Topology::new(1);
    let _b1 = start_backend(&t.backends[0], "be1");
    let mut xlb = XlbProcess::start(&t.lb, &lb_config(1, "shutdown_timeout: 3\n"));
    let instance = xlb.instance.clone().unwrap();
    xlb.signal(Signal::SIGTERM);
    wait_for(Duration::from_secs(2), || (ready_code(&t.lb) == Some(503)).then_some(())).expect("draining");
    xlb.signal(Signal::SIGUSR2);
    std::thread::sleep(Duration::from_millis(300));
    assert!(xlb.child.try_wait().unwrap().is_none(), "still draining");
    assert!(
        xlb.log().contains("SIGUSR2") && xlb.log().contains("a handover is refused while draining"),
        "{}",
        xlb.log()
    );
    assert!(xlb.wait(Duration::from_secs(6)).expect("exits at the deadline").success());
    assert!(!pin_dir(&instance).exists(), "a drain, not a handover: pins removed");
}

/// The unit's ExecReload (config/xlb.service): `xlb check` then SIGHUP.
fn exec_reload(cfg: &std::path::Path, pid: nix::unistd::Pid) -> bool {
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(["check", "--config"])
        .arg(cfg)
        .output()
        .unwrap()
        .status
        .success();
    if ok {
        nix::sys::signal::kill(pid, Signal::SIGHUP).unwrap();
    }
    ok
}

#[test]
fn systemctl_reload_applies_a_new_backend_list_and_refuses_a_bad_file() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let cfg = lb_config(2, "shutdown_timeout: 1\n");
    let xlb = XlbProcess::start(&t.lb, &cfg);
    let path = xlb.log.with_file_name("xlb.yaml");
    let only_be2: String =
        cfg.lines().filter(|l| !l.contains("name: be1")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, format!("{only_be2}conntrack_capacity: 5000\n")).unwrap();
    assert!(exec_reload(&path, xlb.pid()));
    wait_for(Duration::from_secs(5), || xlb.log().contains("backend removed: be1").then_some(()))
        .unwrap_or_else(|| panic!("reload applied:\n{}", xlb.log()));
    assert!(xlb.log().contains("conntrack_capacity changed but needs a restart"), "{}", xlb.log());
    let answers = t.client.run(|| (0..10).map(|_| http_get(&url(), "/").unwrap().body).collect::<Vec<_>>());
    assert!(answers.iter().all(|a| a == b"backend be2\n"), "{answers:?}");

    // A bad file: `xlb check` refuses it and no signal is sent; a SIGHUP
    // sent anyway is refused by XLB itself. Either way it keeps serving.
    std::fs::write(&path, "ports: [}\n").unwrap();
    assert!(!exec_reload(&path, xlb.pid()));
    xlb.signal(Signal::SIGHUP);
    wait_for(Duration::from_secs(5), || xlb.log().contains("reload rejected").then_some(()))
        .unwrap_or_else(|| panic!("bad reload logged:\n{}", xlb.log()));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(t.client.run(|| http_get(&url(), "/").map(|r| r.body)).unwrap(), b"backend be2\n");
    assert_eq!(ready_code(&t.lb), Some(200));
    let counted = wait_for(Duration::from_secs(5), || {
        (status(&t.lb)["provider"]["errors"].as_u64().unwrap_or(0) >= 1).then_some(())
    });
    assert!(counted.is_some(), "the rejected reload is counted: {}", status(&t.lb));
}

#[test]
fn detach_never_touches_a_running_instance_and_checks_names() {
    let t = Topology::new(1);
    let _b1 = start_backend(&t.backends[0], "be1");
    let mut xlb = XlbProcess::start(&t.lb, &lb_config(1, "shutdown_timeout: 1\n"));
    let instance = xlb.instance.clone().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(["detach", "--instance", &instance])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused");
    assert!(err.contains(&format!("running (pid {})", xlb.child.id())), "{err}");
    assert!(pin_dir(&instance).exists(), "pins untouched");
    assert!(xdp_attached(&t.lb));
    assert_eq!(t.client.run(|| http_get(&url(), "/").map(|r| r.body)).unwrap(), b"backend be1\n");

    for bad in ["../x", "a/b", "UPPER", ""] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_xlb"))
            .args(["detach", "--instance", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("is not an instance name"), "{bad:?}");
    }
    assert!(xlb.terminate().success());
}

#[test]
fn a_failed_table_write_is_retried_until_the_data_plane_converges() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let cfg = lb_config(2, "shutdown_timeout: 1\n");
    let xlb = XlbProcess::start_with_env(&t.lb, &cfg, &[("XLB_FAULT_TABLE_WRITES", "3")]);
    let path = xlb.log.with_file_name("xlb.yaml");
    let only_be2: String =
        cfg.lines().filter(|l| !l.contains("name: be1")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, only_be2).unwrap();
    xlb.signal(Signal::SIGHUP);
    wait_for(Duration::from_secs(5), || (ready_code(&t.lb) == Some(503)).then_some(()))
        .unwrap_or_else(|| panic!("not converged while the writes fail:\n{}", xlb.log()));
    let reason = t.lb.run(|| http_get("127.0.0.1:9090", "/readyz").map(|r| r.body)).unwrap();
    assert_eq!(String::from_utf8_lossy(&reason).trim(), "not_converged");
    wait_for(Duration::from_secs(10), || (ready_code(&t.lb) == Some(200)).then_some(()))
        .unwrap_or_else(|| panic!("converged after the injected failures:\n{}", xlb.log()));
    let log = xlb.log();
    assert!(log.contains("writing the backend table failed") && log.contains("has converged"), "{log}");
    assert!(log.contains("backend removed: be1"), "{log}");
    let answers = t.client.run(|| (0..10).map(|_| http_get(&url(), "/").unwrap().body).collect::<Vec<_>>());
    assert!(answers.iter().all(|a| a == b"backend be2\n"), "{answers:?}");
}

#[test]
fn healthz_fails_when_the_data_plane_worker_hangs() {
    let t = Topology::new(1);
    let _b1 = start_backend(&t.backends[0], "be1");
    let xlb = XlbProcess::start_with_env(
        &t.lb,
        &lb_config(1, ""),
        &[("XLB_FAULT_STALL_AFTER_SECS", "2"), ("XLB_WATCHDOG_SECS", "3")],
    );
    let health = || t.lb.run(|| http_get("127.0.0.1:9090", "/healthz").ok().map(|r| (r.status, r.body)));
    assert_eq!(health().map(|h| h.0), Some(200));
    let failed = wait_for(Duration::from_secs(15), || health().filter(|h| h.0 == 503));
    let (_, body) = failed.unwrap_or_else(|| panic!("/healthz fails once the worker hangs:\n{}", xlb.log()));
    assert!(
        String::from_utf8_lossy(&body).contains("data plane unresponsive"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    // The process is wedged by design; dropping it kills it.
}

/// Per-backend numbers are keyed by address: a restart whose backend list
/// differs (so the new process numbers its backends differently) still
/// credits each adopted connection to the backend it really goes to.
#[test]
fn adopted_connections_are_counted_for_the_right_backend() {
    let t = Topology::new(3);
    let _b: Vec<_> = (1..=3).map(|k| start_backend(&t.backends[k - 1], &format!("be{k}"))).collect();
    let first = lb_config(2, "shutdown_timeout: 1\n");
    let name = first.lines().next().unwrap().to_string();
    let mut xlb = XlbProcess::start(&t.lb, &first);
    let mut conns = open_connections(&t.client).join().unwrap();
    ping_all(&mut conns, "before");
    xlb.signal(Signal::SIGKILL);
    xlb.wait(Duration::from_secs(5)).expect("killed");

    // be1 leaves, be3 joins: the new process numbers be2 and be3 from 0.
    let second = lb_config(3, "shutdown_timeout: 1\n")
        .lines()
        .skip(1)
        .filter(|l| !l.contains("name: be1"))
        .fold(name, |acc, l| acc + "\n" + l)
        + "\n";
    let xlb2 = XlbProcess::start(&t.lb, &second);
    ping_all(&mut conns, "after");
    let flows = std::process::Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(["flows", "--json", "--instance", xlb2.instance.as_deref().unwrap()])
        .output()
        .unwrap();
    let flows: serde_json::Value = serde_json::from_slice(&flows.stdout).expect("flows --json");
    let per_addr = |addr: &str| {
        flows
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f.to_string().contains(&format!("\"{addr}:8080\"")))
            .count() as u64
    };
    let (n1, n2) = (per_addr(&backend_ip(1)), per_addr(&backend_ip(2)));
    assert_eq!(n1 + n2, 20, "{flows}");
    let shown = wait_for(Duration::from_secs(5), || {
        let s = status(&t.lb);
        let get = |k: usize| {
            s["backends"]
                .as_array()?
                .iter()
                .find(|b| b["address"] == backend_ip(k))
                .map(|b| b["connections_active"].as_u64().unwrap_or(0))
        };
        (get(1) == Some(n1) && get(2) == Some(n2) && get(3) == Some(0)).then_some(())
    });
    assert!(shown.is_some(), "be1 {n1}, be2 {n2}, be3 0 by address: {}", status(&t.lb)["backends"]);
    let be1 = status(&t.lb)["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == backend_ip(1))
        .cloned()
        .unwrap();
    assert_eq!(be1["state"], "draining", "{be1}");
    assert_eq!(be1["name"], backend_ip(1), "not listed by this process: known by its address");
    drop(conns);
    drop(xlb2);
}
