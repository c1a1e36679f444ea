//! What tells a running XLB to do something: signals and the shutdown file,
//! turned into one stream of decisions, with the rules for the order in which
//! Kubernetes and systemd really deliver them.
//!
//! - SIGTERM, SIGINT or the shutdown file starts the drain; whichever comes
//!   first, and with any gap between them, there is one drain of the full
//!   `shutdown_timeout` (the kubelet runs the preStop hook, which creates the
//!   file, and sends SIGTERM as soon as it returns).
//! - During the drain only an explicit second request ends it early: a
//!   SIGINT (an operator's Ctrl-C), or a SIGTERM that arrives more than half
//!   of `shutdown_timeout` after the drain began (a kubelet's SIGTERM comes
//!   at once). Everything else is logged and changes nothing.
//! - SIGHUP asks for a reload; SIGUSR2 for a handover (refused while
//!   draining).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook_tokio::Signals;
use tracing::{info, warn};

/// How often the shutdown file is looked for.
const SHUTDOWN_FILE_POLL: Duration = Duration::from_millis(200);

/// What started the drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    Signal(&'static str),
    File(PathBuf),
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Signal(s) => f.write_str(s),
            Trigger::File(p) => write!(f, "{} appeared", p.display()),
        }
    }
}

/// What to do, while running.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Drain, timed from `at`: when the signal arrived or the file was made
    /// (during startup that is earlier than when XLB could act on it).
    Drain(Trigger, Instant),
    Handover,
    Reload,
}

pub struct Triggers {
    /// Signals as they arrive, with the moment they did: a task stamps them,
    /// so one that comes during startup keeps its time.
    signals: tokio::sync::mpsc::UnboundedReceiver<(i32, Instant)>,
    _stamper: crate::provider::TaskGuard,
    file: PathBuf,
    /// Seen during the drain, so it is logged once.
    file_seen: bool,
}

impl Triggers {
    /// Catches the signals from here on. A shutdown file older than this
    /// process is a leftover of an earlier run and is removed (with a
    /// warning); a newer one is a request (preStop may run before XLB is
    /// even ready) and starts the drain at once.
    pub fn install(file: &Path) -> Result<Triggers> {
        let mut raw =
            Signals::new([SIGTERM, SIGINT, SIGUSR2, SIGHUP]).context("installing signal handlers")?;
        let (tx, signals) = tokio::sync::mpsc::unbounded_channel();
        let stamper = tokio::spawn(async move {
            while let Some(sig) = raw.next().await {
                if tx.send((sig, Instant::now())).is_err() {
                    return;
                }
            }
        });
        clear_stale_shutdown_file(file, process_start());
        Ok(Triggers {
            signals,
            _stamper: crate::provider::TaskGuard(stamper),
            file: file.to_path_buf(),
            file_seen: false,
        })
    }

    /// Waits for the next request while running.
    pub async fn next(&mut self) -> Request {
        let mut poll = tokio::time::interval(SHUTDOWN_FILE_POLL);
        loop {
            tokio::select! {
                Some((sig, at)) = self.signals.recv() => match sig {
                    SIGUSR2 => return Request::Handover,
                    SIGHUP => return Request::Reload,
                    s => return Request::Drain(Trigger::Signal(signal_name(s)), at),
                },
                _ = poll.tick() => {
                    if let Ok(meta) = std::fs::metadata(&self.file) {
                        self.file_seen = true;
                        // Its age says when it was made (not in the future).
                        let age = meta.modified().ok().and_then(|m| m.elapsed().ok()).unwrap_or_default();
                        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                        return Request::Drain(Trigger::File(self.file.clone()), at);
                    }
                }
            }
        }
    }

    /// Waits out a drain that began at `began` and lasts `timeout`; returns
    /// early only on an explicit second request. Logs what every signal and
    /// the shutdown file did.
    pub async fn drain(&mut self, began: Instant, timeout: Duration) -> DrainEnd {
        let deadline = tokio::time::Instant::from_std(began + timeout);
        let mut poll = tokio::time::interval(SHUTDOWN_FILE_POLL);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return DrainEnd::Deadline,
                Some((sig, _)) = self.signals.recv() => {
                    let into = began.elapsed();
                    match drain_decision(sig, into, timeout) {
                        Decision::End => {
                            info!("{} {:.1}s into the drain: ending it now", signal_name(sig), into.as_secs_f64());
                            return DrainEnd::Early(signal_name(sig));
                        }
                        Decision::Continue(why) => {
                            info!("{} {:.1}s into the drain: {why}", signal_name(sig), into.as_secs_f64())
                        }
                    }
                }
                _ = poll.tick() => {
                    if !self.file_seen && self.file.exists() {
                        self.file_seen = true;
                        info!(
                            "{} appeared {:.1}s into the drain: already draining",
                            self.file.display(),
                            began.elapsed().as_secs_f64()
                        );
                    }
                }
            }
        }
    }
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum DrainEnd {
    Deadline,
    Early(&'static str),
}

#[derive(Debug, PartialEq, Eq)]
enum Decision {
    End,
    Continue(&'static str),
}

/// The drain rule (module doc), for a signal `into` the drain.
fn drain_decision(sig: i32, into: Duration, timeout: Duration) -> Decision {
    match sig {
        SIGINT => Decision::End,
        SIGTERM if into > timeout / 2 => Decision::End,
        SIGTERM => Decision::Continue(
            "the drain continues (a SIGTERM ends it only after half of shutdown_timeout; SIGINT ends it at once)",
        ),
        SIGUSR2 => Decision::Continue("a handover is refused while draining"),
        SIGHUP => Decision::Continue("no reload while draining: the backend set is frozen"),
        _ => Decision::Continue("ignored"),
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        SIGUSR2 => "SIGUSR2",
        SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// When this process started: the boot time plus its start in clock ticks
/// (/proc/self/stat), at worst a second early; now if /proc cannot say.
fn process_start() -> SystemTime {
    let read = || -> Option<SystemTime> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may
        // hold spaces; starttime is field 22 of the whole line.
        let rest = &stat[stat.rfind(')')? + 2..];
        let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
        let btime: u64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
        // SAFETY: sysconf only reads a constant.
        let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(btime) + Duration::from_millis(ticks * 1000 / hz))
    };
    read().unwrap_or_else(SystemTime::now)
}

fn clear_stale_shutdown_file(path: &Path, started: SystemTime) {
    let Ok(meta) = std::fs::metadata(path) else { return };
    let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    if modified >= started {
        warn!(file = %path.display(), "the shutdown file was created as this process started: draining at once");
        return;
    }
    warn!(file = %path.display(), "removing a shutdown file left from an earlier run");
    if let Err(e) = std::fs::remove_file(path) {
        warn!(file = %path.display(), "could not remove it: {e}; xlb would stop at once");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_rule() {
        let t = Duration::from_secs(60);
        let s = Duration::from_secs;
        assert_eq!(drain_decision(SIGINT, s(0), t), Decision::End);
        assert!(matches!(drain_decision(SIGTERM, Duration::from_millis(400), t), Decision::Continue(_)));
        assert!(matches!(drain_decision(SIGTERM, s(30), t), Decision::Continue(_)));
        assert_eq!(drain_decision(SIGTERM, s(31), t), Decision::End);
        assert!(matches!(drain_decision(SIGUSR2, s(1), t), Decision::Continue(_)));
        assert!(matches!(drain_decision(SIGHUP, s(1), t), Decision::Continue(_)));
    }

    #[test]
    fn process_start_is_in_the_recent_past() {
        let age = SystemTime::now().duration_since(process_start()).expect("not in the future");
        assert!(age < Duration::from_secs(3600), "{age:?}");
    }

    #[test]
    fn only_a_file_older_than_the_process_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("shutdown");
        std::fs::write(&f, "").unwrap();
        let now = SystemTime::now();
        clear_stale_shutdown_file(&f, now - Duration::from_secs(5));
        assert!(f.exists(), "created after the process started: a request");
        clear_stale_shutdown_file(&f, now + Duration::from_secs(5));
        assert!(!f.exists(), "older than the process: removed");
    }
}
