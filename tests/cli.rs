//! The command line as a user meets it: exit codes, one-line errors, the
//! effective config, and refusals that must happen before anything attaches.

mod common;

use std::process::{Command, Output};

fn xlb(args: &[&str], config: Option<&str>) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("xlb.yaml");
    if let Some(c) = config {
        std::fs::write(&path, c).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(args.iter().map(|a| a.replace("CFG", path.to_str().unwrap())))
        .env_remove("XLB_CONFIG")
        .current_dir(dir.path())
        .output()
        .unwrap();
    (out, dir)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `xlb run -c cfg` inside `ns`'s network namespace.
fn run_in(ns: &common::Netns, cfg: &std::path::Path) -> Output {
    Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(env!("CARGO_BIN_EXE_xlb"))
        .args(["run", "-c"])
        .arg(cfg)
        .output()
        .unwrap()
}

const GOOD: &str = "ports: [{local_port: 80, remote_port: 8080}]\nprovider: {static: {backends: [{name: a, ip: 10.9.0.2}]}}\n";

#[test]
fn version_prints_the_crate_version() {
    let (o, _d) = xlb(&["version"], None);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), format!("xlb {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_prints_the_effective_config_with_defaults() {
    let (o, _d) = xlb(&["check", "--config", "CFG"], Some(GOOD));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for key in [
        "orphan_ttl_secs: 300",
        "shutdown_timeout: 15",
        "shutdown_file: /tmp/shutdown",
        "port: 9090",
        "listen: auto",
    ] {
        assert!(out.contains(key), "{key} missing from:\n{out}");
    }
    // -c works too, and the printed config is itself valid.
    let (o2, _d2) = xlb(&["check", "-c", "CFG"], Some(&out));
    assert!(o2.status.success(), "{}", stderr(&o2));
}

#[test]
fn check_rejects_bad_config_with_one_line_and_status_2() {
    let (o, _d) = xlb(&["check", "-c", "CFG"], Some(&format!("{GOOD}bogus_key: 1\n")));
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("bogus_key") && e.contains("line 3"), "{e}");
}

#[test]
fn check_names_a_missing_file() {
    let (o, _d) = xlb(&["check", "-c", "/nonexistent/xlb.yaml"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/xlb.yaml"));
}

#[test]
fn config_path_comes_from_xlb_config_or_defaults_to_dot_xlb_yaml() {
    let (o, d) = xlb(&["check"], Some(GOOD));
    assert!(o.status.success(), "default ./xlb.yaml: {}", stderr(&o));
    let o = Command::new(env!("CARGO_BIN_EXE_xlb"))
        .arg("check")
        .env("XLB_CONFIG", d.path().join("xlb.yaml"))
        .current_dir("/")
        .output()
        .unwrap();
    assert!(o.status.success(), "XLB_CONFIG: {}", stderr(&o));
}

#[test]
fn run_refuses_udp_before_attaching() {
    let (o, _d) = xlb(&["run", "-c", "CFG"], Some(&format!("{GOOD}proto: udp\n")));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("udp is not supported yet"), "{}", stderr(&o));
}

#[test]
fn run_with_a_bad_config_exits_2_and_plain_xlb_means_run() {
    let (o, _d) = xlb(&["-c", "CFG"], Some("ports: []\n"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn run_refuses_a_listen_ip_that_is_not_local_and_attaches_nothing() {
    let ns = common::Netns::new("xc");
    ns.exec("ip link add v0 type veth peer name v1 && ip addr add 10.9.0.1/24 dev v0 && ip link set v0 up && ip link set v1 up");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("xlb.yaml");
    std::fs::write(&cfg, format!("listen: {{ip: 10.9.0.77}}\n{GOOD}")).unwrap();
    let o = run_in(&ns, &cfg);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("10.9.0.77 is not an address on any local interface"), "{}", stderr(&o));
    let links = ns.exec("ip -d link show");
    assert!(!String::from_utf8_lossy(&links.stdout).contains("prog/xdp"));
}

#[test]
fn run_refuses_a_snat_pool_address_that_is_not_local_and_attaches_nothing() {
    let ns = common::Netns::new("xc");
    ns.exec("ip link add v0 type veth peer name v1 && ip addr add 10.9.0.1/24 dev v0 && ip addr add 10.9.0.2/32 dev lo && ip link set v0 up && ip link set v1 up");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("xlb.yaml");
    std::fs::write(&cfg, format!("listen: {{ip: 10.9.0.1}}\nsnat_ips: [10.9.0.2, 10.9.0.78]\n{GOOD}"))
        .unwrap();
    let o = run_in(&ns, &cfg);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("snat_ips: 10.9.0.78 is not an address on any local interface"),
        "{}",
        stderr(&o)
    );
    let links = ns.exec("ip -d link show");
    assert!(!String::from_utf8_lossy(&links.stdout).contains("prog/xdp"));
}

#[test]
fn run_refuses_a_nat_range_the_kernel_could_hand_out() {
    let ns = common::Netns::new("xc");
    ns.exec("ip link add v0 type veth peer name v1 && ip addr add 10.9.0.1/24 dev v0 && ip link set v0 up && ip link set v1 up && sysctl -qw net.ipv4.ip_local_port_range=\"32768 60999\"");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("xlb.yaml");
    std::fs::write(
        &cfg,
        format!("listen: {{ip: 10.9.0.1}}\nnat_port_range: {{min: 30000, max: 40000}}\n{GOOD}"),
    )
    .unwrap();
    let o = run_in(&ns, &cfg);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("overlaps the kernel's ephemeral port range 32768-60999"), "{e}");
    assert!(!String::from_utf8_lossy(&ns.exec("ip -d link show").stdout).contains("prog/xdp"));
}
