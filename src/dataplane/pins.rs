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

    /// True when pins can be made here: the directory, or else the nearest
    /// of its parents that exists, is on bpffs. A pod mounts the instance's
    /// directory alone (a hostPath of /sys/fs/bpf/xlb/<name>), so the
    /// container's /sys/fs/bpf above it is no bpffs.
    pub fn on_bpffs(&self) -> bool {
        self.path.ancestors().find(|a| a.exists()).is_some_and(is_bpffs)
    }

    /// Removes every pin of this instance (what it pinned stays alive only
    /// while some process still holds it), then the directory unless it is a
    /// mount point (a pod's hostPath of it), which stays, empty.
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::read_dir(&self.path) {
            Ok(dir) => {
                for e in dir {
                    std::fs::remove_file(e?.path())?;
                }
                match std::fs::remove_dir(&self.path) {
                    Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => Ok(()),
                    r => r,
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::fd::AsFd;

    fn mount(src: &Path, dst: &Path, fstype: Option<&str>, flags: nix::libc::c_ulong) {
        let (src, dst) = (cpath(src).unwrap(), cpath(dst).unwrap());
        let fstype = fstype.map(|t| CString::new(t).unwrap());
        let fstype_ptr = fstype.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
        // SAFETY: NUL-terminated strings that outlive the call; no mount data.
        let rc = unsafe { nix::libc::mount(src.as_ptr(), dst.as_ptr(), fstype_ptr, flags, std::ptr::null()) };
        assert_eq!(rc, 0, "mount {src:?} on {dst:?}: {}", io::Error::last_os_error());
    }

    /// The pod's view (chart: an emptyDir at /sys/fs/bpf, the hostPath of
    /// the instance's directory below it), made in a mount namespace of the
    /// test thread's own: `host` is a bpffs, `pod` a tmpfs with only
    /// host/xlb/inst bind-mounted into it.
    #[test]
    fn pins_through_a_mounted_instance_directory() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare mount namespace");
            mount(Path::new("/"), Path::new("/"), None, nix::libc::MS_REC | nix::libc::MS_PRIVATE);
            let tmp = tempfile::tempdir().unwrap();
            let (host, pod) = (tmp.path().join("host"), tmp.path().join("pod"));
            std::fs::create_dir_all(&host).unwrap();
            std::fs::create_dir_all(&pod).unwrap();
            mount(Path::new("bpf"), &host, Some("bpf"), 0);
            mount(Path::new("tmpfs"), &pod, Some("tmpfs"), 0);
            std::fs::create_dir_all(host.join("xlb/inst")).unwrap();
            std::fs::create_dir_all(pod.join("xlb/inst")).unwrap();
            mount(&host.join("xlb/inst"), &pod.join("xlb/inst"), None, nix::libc::MS_BIND);

            let dir = PinDir { path: pod.join("xlb/inst") };
            assert!(!is_bpffs(&pod), "the pod's /sys/fs/bpf is no bpffs");
            assert!(dir.on_bpffs(), "its mounted instance directory is");
            assert!(
                !PinDir { path: pod.join("xlb/other") }.on_bpffs(),
                "nothing else of the host's is there"
            );
            assert!(PinDir { path: host.join("xlb/new") }.on_bpffs(), "a directory still to make on bpffs");
            assert!(!PinDir { path: tmp.path().join("none/xlb/inst") }.on_bpffs());

            // A map pinned through the pod's path is the host's pin.
            let opts = libbpf_sys::bpf_map_create_opts {
                sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
                ..Default::default()
            };
            let map =
                libbpf_rs::MapHandle::create(libbpf_rs::MapType::Array, Some("pintest"), 4, 4, 1, &opts)
                    .expect("creating a map");
            std::fs::create_dir_all(&dir.path).unwrap();
            let lock = lock(&dir).expect("locking the mounted directory");
            pin(map.as_fd(), &dir.map("conntrack")).expect("pinning");
            assert!(
                open(&host.join("xlb/inst/map_conntrack")).unwrap().is_some(),
                "pinned on the host's bpffs"
            );

            // Removing the instance's pins empties the mount point and keeps it.
            dir.remove().expect("removing pins under a mount point");
            drop(lock);
            assert!(dir.path.is_dir());
            assert_eq!(std::fs::read_dir(host.join("xlb/inst")).unwrap().count(), 0);
            for m in [pod.join("xlb/inst"), pod, host] {
                let c = cpath(&m).unwrap();
                // SAFETY: a NUL-terminated path.
                assert_eq!(
                    unsafe { nix::libc::umount2(c.as_ptr(), nix::libc::MNT_DETACH) },
                    0,
                    "umount {m:?}"
                );
            }
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    }
}
