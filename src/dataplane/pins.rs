//! Pins under /sys/fs/bpf/xlb/<instance>/: the conntrack map and one bpf_link
//! per interface outlive the process, so a restarted (or crashed, or
//! upgraded) XLB adopts live connections and swaps the program atomically.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use libbpf_rs::libbpf_sys;

/// Where all instances pin.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/xlb";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// An instance's pin directory.
#[derive(Debug, Clone)]
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn for_instance(instance: &str) -> PinDir {
        PinDir { path: Path::new(BPFFS_ROOT).join(instance) }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(format!("map_{name}"))
    }

    pub fn link(&self, ifname: &str) -> PathBuf {
        self.path.join(format!("link_{ifname}"))
    }

    /// Interface names with a pinned link.
    pub fn linked_ifaces(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.path) else { return Vec::new() };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("link_").map(str::to_string)).collect()
    }

    /// Removes every pin of this instance (what it pinned stays alive only
    /// while some process still holds it).
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::read_dir(&self.path) {
            Ok(dir) => {
                for e in dir {
                    std::fs::remove_file(e?.path())?;
                }
                std::fs::remove_dir(&self.path)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The instance's lock if nobody holds it; None when a running instance
/// does (any other failure is an error).
pub fn try_lock(p: &PinDir) -> anyhow::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let dir = std::fs::File::open(&p.path)?;
    match nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(anyhow::anyhow!("locking {}: {e}", p.path.display())),
    }
}

/// Takes the instance's lock (an flock on its pin directory), or says which
/// instance is running.
pub fn lock(p: &PinDir) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = std::fs::File::open(&p.path)?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        let instance = p.path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        anyhow::anyhow!(
            "instance {instance} is already running on this host ({} is locked: {e}); \
             stop it first, or give this one another `name`",
            p.path.display()
        )
    })
}

/// The pid holding an instance's lock (a running `xlb run`), from
/// /proc/locks, or None when nobody does.
pub fn lock_holder(p: &PinDir) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&p.path).ok()?;
    let (ino, dev) = (meta.ino(), meta.dev());
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF"
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (pid, id) = (f.get(4)?, f.get(5)?);
        let mut parts = id.split(':');
        let maj = u64::from_str_radix(parts.next()?, 16).ok()?;
        let min = u64::from_str_radix(parts.next()?, 16).ok()?;
        let i: u64 = parts.next()?.parse().ok()?;
        (f.get(1) == Some(&"FLOCK") && maj == major && min == minor && i == ino).then(|| pid.parse().ok())?
    })
}

/// True when `path`'s file system is bpffs (pins need it).
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Every instance with pins.
pub fn instances() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(BPFFS_ROOT) else { return Vec::new() };
    let mut v: Vec<String> = dir.filter_map(|e| e.ok()?.file_name().to_str().map(str::to_string)).collect();
    v.sort();
    v
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::from_raw_os_error(-ret))
    } else {
        Ok(ret)
    }
}

/// Opens a pinned object; Ok(None) when nothing is pinned there.
pub fn open(path: &Path) -> io::Result<Option<OwnedFd>> {
    let c = cpath(path)?;
    // SAFETY: a NUL-terminated path; the returned fd is ours.
    match check(unsafe { libbpf_sys::bpf_obj_get(c.as_ptr()) }) {
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: a valid fd and a NUL-terminated path.
    check(unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), c.as_ptr()) }).map(drop)
}

/// Atomically points an XDP link at another program.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: two valid fds; null opts means "no expectations".
    check(unsafe { libbpf_sys::bpf_link_update(link.as_raw_fd(), prog.as_raw_fd(), std::ptr::null()) })
        .map(drop)
}
