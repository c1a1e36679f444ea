//! Memory at scale (issue #14): with a million connections in the table,
//! xlb's resident memory stays small and the whole pod fits the chart's
//! limit. The real `xlb run` runs in a memory cgroup capped at the chart's
//! limit (512 MiB), which is charged for the BPF maps xlb creates as well as
//! its own pages; xlb-bench writes 1,000,000 connections into its pinned
//! conntrack map (2,000,000 entries: the default capacity, full), some of
//! them ended, and several sweeps run over them. No OOM kill, RSS under
//! 64 MiB throughout (sampled, and the kernel's high-water mark), every
//! ended connection removed and every live one kept.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
/// helm/xlb/values.yaml resources.limits.memory.
const POD_LIMIT: u64 = 512 * MIB;
const RSS_LIMIT: u64 = 64 * MIB;
const LIVE: u64 = 900_000;
const CLOSED: u64 = 50_000;
const ORPHANED: u64 = 50_000;
const LONE: u64 = 5_000;
/// 50 backend addresses on the LB's backend link (10.101.0.0/24): with the
/// default 22,528 NAT ports each they take 1,126,400 connections.
const BACKENDS: std::ops::RangeInclusive<u8> = 10..=59;

/// A memory cgroup of this test, removed on drop (after its processes).
struct MemCgroup {
    path: PathBuf,
    /// cgroup v2 (memory.max...) or v1's memory controller
    /// (memory.limit_in_bytes...): hosts with a hybrid hierarchy have v1.
    v2: bool,
}

impl MemCgroup {
    fn new(limit: u64) -> MemCgroup {
        let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let root = if v2 { "/sys/fs/cgroup" } else { "/sys/fs/cgroup/memory" };
        assert!(
            std::path::Path::new(root).join("cgroup.procs").exists(),
            "no memory cgroup hierarchy at {root}"
        );
        if v2 {
            // The memory controller must be on for the root's children.
            let _ = std::fs::write(format!("{root}/cgroup.subtree_control"), "+memory");
        }
        let path = PathBuf::from(format!("{root}/xlb-test-{}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        let cg = MemCgroup { path, v2 };
        cg.write(if v2 { "memory.max" } else { "memory.limit_in_bytes" }, &limit.to_string());
        // No way out through swap, where the host has swap accounting.
        let swap = if v2 {
            ("memory.swap.max", "0".to_string())
        } else {
            ("memory.memsw.limit_in_bytes", limit.to_string())
        };
        let _ = std::fs::write(cg.path.join(swap.0), swap.1);
        cg
    }

    fn write(&self, file: &str, value: &str) {
        let p = self.path.join(file);
        std::fs::write(&p, value).unwrap_or_else(|e| panic!("writing {value} to {}: {e}", p.display()));
    }

    fn read(&self, file: &str) -> String {
        let p = self.path.join(file);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
    }

    fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    fn number(&self, file: &str) -> u64 {
        self.read(file).trim().parse().unwrap_or_else(|_| panic!("{file} is a number"))
    }

    /// The most memory charged at once since creation: pages and kernel
    /// memory, BPF maps included.
    fn peak(&self) -> u64 {
        self.number(if self.v2 { "memory.peak" } else { "memory.max_usage_in_bytes" })
    }

    fn current(&self) -> u64 {
        self.number(if self.v2 { "memory.current" } else { "memory.usage_in_bytes" })
    }

    /// Processes the OOM killer killed in this cgroup.
    fn oom_kills(&self) -> u64 {
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        let text = self.read(file);
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .unwrap_or_else(|| panic!("no oom_kill in {file}: {text}"))
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Empty by now (the xlb process is dropped first); retry briefly
        // while the kernel finishes reaping it.
        wait_for(Duration::from_secs(5), || std::fs::remove_dir(&self.path).ok());
    }
}

/// A process's VmRSS and VmHWM in bytes, while it exists.
fn vm(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |k: &str| -> Option<u64> {
        s.lines().find_map(|l| l.strip_prefix(k))?.split_whitespace().next()?.parse::<u64>().ok()
    };
    Some((kb("VmRSS:")? * 1024, kb("VmHWM:")? * 1024))
}

/// Samples a process's memory every 50 ms until stopped: the largest VmRSS
/// seen and the last VmHWM (the kernel's own high-water mark).
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut rss, mut hwm) = (0, 0);
            while !flag.load(Ordering::Relaxed) {
                if let Some((r, h)) = vm(pid) {
                    rss = rss.max(r);
                    hwm = hwm.max(h);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (rss, hwm)
        });
        Sampler { stop, thread: Some(thread) }
    }

    /// (largest VmRSS sampled, VmHWM)
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// One sweep as xlb logs it at debug level ("conntrack sweep ms=.. active=..").
#[derive(Debug, Default, Clone, Copy)]
struct Sweep {
    ms: u64,
    active: u64,
    closed: u64,
    orphaned: u64,
    unpaired: u64,
}

fn sweeps(log: &str) -> Vec<Sweep> {
    log.lines()
        .filter(|l| l.contains("conntrack sweep"))
        .map(|l| {
            let field = |k: &str| -> u64 {
                let at = l.find(&format!("{k}=")).unwrap_or_else(|| panic!("{k} in {l}"));
                l[at + k.len() + 1..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{k} in {l}"))
            };
            Sweep {
                ms: field("ms"),
                active: field("active"),
                closed: field("closed"),
                orphaned: field("orphaned"),
                unpaired: field("unpaired"),
            }
        })
        .collect()
}

/// Sum of what the sweeps after the first `from` removed.
fn removed_since(all: &[Sweep], from: usize) -> (u64, u64, u64) {
    all[from..].iter().fold((0, 0, 0), |(c, o, u), s| (c + s.closed, o + s.orphaned, u + s.unpaired))
}

/// Runs xlb-bench fill-pinned against the instance; its JSON summary.
fn fill(instance: &str, snat: &str, args: &[&str]) -> serde_json::Value {
    let backends = format!("10.101.0.{}-{}", BACKENDS.start(), BACKENDS.end());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xlb-bench"))
        .args(["fill-pinned", "--instance", instance, "--listen", &format!("{LISTEN}:80")])
        .args(["--snat", snat, "--backends", &backends, "--backend-port", "8080"])
        .args(args)
        .output()
        .expect("xlb-bench runs");
    assert!(
        out.status.success(),
        "xlb-bench fill-pinned failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("xlb-bench prints JSON")
}

/// Entries in the instance's pinned conntrack map.
fn entries(instance: &str) -> u64 {
    let map = libbpf_rs::MapHandle::from_pinned_path(pin_dir(instance).join("map_conntrack")).unwrap();
    let mut n = 0;
    xlb::dataplane::for_each_conntrack_batch(&map, |b| {
        n += b.len() as u64;
        Ok(())
    })
    .unwrap();
    n
}

/// The conntrack map's kernel memory (its fdinfo's memlock).
fn map_bytes(instance: &str) -> u64 {
    use std::os::fd::{AsFd, AsRawFd};
    let map = libbpf_rs::MapHandle::from_pinned_path(pin_dir(instance).join("map_conntrack")).unwrap();
    let fd = map.as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    info.lines().find_map(|l| l.strip_prefix("memlock:")).unwrap().trim().parse().unwrap()
}

fn sum_backends(status: &serde_json::Value, key: &str) -> u64 {
    status["backends"].as_array().unwrap().iter().map(|b| b[key].as_u64().unwrap()).sum()
}

/// Whether xlb still runs, and what the OOM killer did: why sweeps stopped.
fn fate(xlb: &mut XlbProcess, cgroup: &MemCgroup) -> String {
    let state = match xlb.child.try_wait() {
        Ok(None) => "xlb runs".to_string(),
        Ok(Some(code)) => format!("xlb exited: {code}"),
        Err(e) => format!("xlb: {e}"),
    };
    format!("{state}; cgroup oom_kill {}, peak {} MiB", cgroup.oom_kills(), cgroup.peak() / MIB)
}

#[test]
fn a_million_connections_fit_the_pod_limit_and_xlb_stays_small() {
    let started = Instant::now();
    let t = Topology::new(1);
    let cgroup = MemCgroup::new(POD_LIMIT);
    let ips = BACKENDS.map(|d| format!("10.101.0.{d}"));
    let cfg = static_config(LISTEN, ips, "shutdown_timeout: 1\n");
    let mut xlb = XlbProcess::start_in_cgroup(
        &t.lb,
        &cfg,
        &cgroup.procs(),
        &[("RUST_LOG", "info,xlb::sweep=debug"), ("XLB_SWEEP_MAX_PAUSE_MS", "5000")],
    );
    let pid = xlb.child.id();
    let sampler = Sampler::start(pid);
    let instance = xlb.instance.clone().unwrap();
    let status = common::status(&t.lb);
    let snat = status["snat"].as_str().expect("status names the SNAT address").to_string();
    assert_eq!(status["conntrack_capacity"].as_u64(), Some(1_000_000), "the default capacity");
    let idle_rss = vm(pid).unwrap().0;

    // A million connections, the table full: 900,000 live, 50,000 closed
    // and 50,000 idle past orphan_ttl_secs (300 s).
    let before = sweeps(&xlb.log()).len();
    let t_fill = Instant::now();
    let filled = fill(
        &instance,
        &snat,
        &["--live", &LIVE.to_string(), "--closed", &CLOSED.to_string(), "--orphaned", &ORPHANED.to_string()],
    );
    let fill_secs = t_fill.elapsed().as_secs_f64();
    assert_eq!(filled["entries_written"].as_u64(), Some(2 * (LIVE + CLOSED + ORPHANED)), "{filled}");
    // Sweeps until one has found exactly the live ones and every ended one
    // is gone; none may have taken a live half for a lone one.
    let settled = wait_for(Duration::from_secs(150), || {
        let all = sweeps(&xlb.log());
        let (closed, orphaned, _) = removed_since(&all, before);
        (all.last().is_some_and(|s| s.active == LIVE) && closed == CLOSED && orphaned == ORPHANED)
            .then_some(all.len())
    });
    let all = sweeps(&xlb.log());
    assert!(
        settled.is_some(),
        "the sweeps did not settle on {LIVE} live connections ({}): {:?}",
        fate(&mut xlb, &cgroup),
        &all[before..]
    );
    assert_eq!(removed_since(&all, before), (CLOSED, ORPHANED, 0), "{:?}", &all[before..]);
    assert_eq!(entries(&instance), 2 * LIVE, "both entries of every live connection stay");

    // Half-finished pairs: 5,000 forward entries without their reverse and
    // 5,000 reverse entries without their forward, removed as unpaired.
    let before_lone = all.len();
    fill(&instance, &snat, &["--from", "1000000", "--lone", &LONE.to_string()]);
    let cleaned = wait_for(Duration::from_secs(120), || {
        let all = sweeps(&xlb.log());
        (removed_since(&all, before_lone).2 == 2 * LONE).then_some(())
    });
    let all = sweeps(&xlb.log());
    assert!(
        cleaned.is_some(),
        "the lone entries were not all removed ({}): {:?}",
        fate(&mut xlb, &cgroup),
        &all[before_lone..]
    );
    assert_eq!(removed_since(&all, before_lone), (0, 0, 2 * LONE), "{:?}", &all[before_lone..]);
    assert!(all[before_lone..].iter().all(|s| s.active == LIVE), "{:?}", &all[before_lone..]);
    assert_eq!(entries(&instance), 2 * LIVE);

    let status = common::status(&t.lb);
    assert_eq!(status["connections_active"].as_u64(), Some(LIVE), "status counts the live ones");
    assert_eq!(sum_backends(&status, "connections_closed_fin"), CLOSED);
    assert_eq!(sum_backends(&status, "connections_orphaned"), ORPHANED);
    // Several sweeps over the million (the first may have begun during the
    // fill), the last two at least over all of it, and nothing removed but
    // what had ended.
    let since_fill = |all: &[Sweep]| all.len() - before;
    wait_for(Duration::from_secs(120), || (since_fill(&sweeps(&xlb.log())) >= 3).then_some(()));
    let all = sweeps(&xlb.log());
    assert!(
        since_fill(&all) >= 3,
        "several sweeps since the fill ({}): {:?}",
        fate(&mut xlb, &cgroup),
        &all[before..]
    );
    assert!(all[all.len() - 2..].iter().all(|s| s.active == LIVE), "{:?}", &all[before..]);
    assert_eq!(removed_since(&all, before), (CLOSED, ORPHANED, 2 * LONE), "{:?}", &all[before..]);
    let full_sweeps: Vec<u64> = all[before..].iter().filter(|s| s.active == LIVE).map(|s| s.ms).collect();

    // The drain reads the table once more (open connections at the end).
    let map_mem = map_bytes(&instance);
    let current = cgroup.current();
    let code = xlb.terminate();
    let (rss, hwm) = sampler.finish();
    let peak = cgroup.peak();
    let oom = cgroup.oom_kills();
    println!(
        "memory at 1M connections: xlb VmRSS idle {:.1} MiB, max sampled {:.1} MiB, VmHWM {:.1} MiB; \
         conntrack map {:.1} MiB (memlock); cgroup now {:.1} MiB, peak {:.1} MiB of {} MiB; oom_kill {oom}",
        idle_rss as f64 / MIB as f64,
        rss as f64 / MIB as f64,
        hwm as f64 / MIB as f64,
        map_mem as f64 / MIB as f64,
        current as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        POD_LIMIT / MIB,
    );
    println!(
        "fill {fill_secs:.1} s; sweeps over >= {LIVE} connections (ms): {full_sweeps:?}; test {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(oom, 0, "the OOM killer struck in the cgroup");
    assert!(code.success(), "xlb exits cleanly after the drain: {code:?}\n{}", xlb.log());
    assert!(rss < RSS_LIMIT, "VmRSS reached {rss} bytes (limit {RSS_LIMIT})");
    assert!(hwm < RSS_LIMIT, "VmHWM reached {hwm} bytes (limit {RSS_LIMIT})");
    // The cgroup is charged for the map xlb created: the pod limit has to
    // hold both.
    assert!(peak > map_mem, "cgroup peak {peak} does not include the {map_mem}-byte conntrack map");
    assert!(peak < POD_LIMIT);
    drop(xlb);
}
